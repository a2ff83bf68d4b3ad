"""
What a night of autoresearch produced, from one or more results.tsv files.

    uv run analysis.py                          # results.tsv here: text report
    uv run analysis.py --json                   # the same, as JSON (for agents)
    uv run analysis.py --plot progress.png      # report + the running best, plotted
    uv run analysis.py --noise 0.002            # improvements under 0.002 are "within noise"
    uv run analysis.py results/mar5-gpu*.tsv --plot plots/progress.png   # compare workers

A results file is the five-column, tab-separated log that program.md asks for:

    commit  val_bpb  memory_gb  status  description

status is keep | discard | crash, or noise for a rerun of an unchanged commit
(to measure how much val_bpb moves by chance). Crash rows carry 0.000000 and
0.0. Blank lines and repeated headers are skipped; malformed lines (too few
columns, numbers that do not parse, an unknown status, a keep/discard/noise
row without a finite val_bpb > 0) are skipped with a warning "file:line: why"
on stderr. A memory_gb that is not a finite number is read as unknown (null).

Definitions (lower val_bpb is better), numbered the way a reader counts:
- baseline: the first keep/discard row, experiment #0. It is not "kept":
  it is where the night starts.
- experiments: the keep/discard/crash rows after the baseline, numbered
  #1, #2, ... in file order. Noise reruns take no number, and crashes before
  the baseline (a baseline that did not run) are counted apart.
- kept, discarded, crashed: experiments by status; they add up to
  experiments, and keep_rate = kept / experiments.
- best: the lowest val_bpb among the baseline and the kept experiments (what
  the branch holds); improvement = baseline - best, also in % of the baseline.
- steps: each kept experiment, with delta = val_bpb - the best before it
  (negative = better); top: the steps sorted by improvement.
- noise: --noise X if given, else the spread measured from noise rows: for
  each commit with noise reruns, max - min of val_bpb over all its non-crash
  rows (the original run and the reruns); the largest such range. A step whose
  improvement is smaller than the noise is flagged within_noise.

JSON (--json): {"files": [summary, ...], "best_file": path or null}; a summary
has path, experiments, kept, discarded, crashed, crashed_before_baseline,
noise_runs, keep_rate, baseline, best, improvement, improvement_pct, noise,
noise_source ("--noise" | "reruns" | null), steps, top, warnings.
baseline/best/steps/top entries are rows: {n (experiment number, 0 for the
baseline), line (in the file), commit, val_bpb, memory_gb, status,
description}; steps and top add prev_best, delta and within_noise. Numbers
are null where there is no data: the output never holds NaN or Infinity.

Functions for reuse and tests: parse(path) -> (rows, warnings),
summarize(rows, path, noise=None) -> dict, report(summaries) -> str,
to_json(summaries) -> dict, plot(summaries, out_path) -> Figure.
"""

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

HEADER = ("commit", "val_bpb", "memory_gb", "status", "description")
STATUSES = ("keep", "discard", "crash", "noise")
TOP_N = 5          # top hits shown in the report
MAX_WARNINGS = 10  # warnings printed per file; --json keeps them all
MAX_LABELS = 25    # kept steps labelled in the plot (the largest gains); TOP_N per file with several


# =============================================================================
# Reading results.tsv
# =============================================================================

@dataclass
class Row:
    n: int | None             # experiment number: 0 the baseline; None for noise reruns and early crashes
    line: int                 # line number in the file
    commit: str
    val_bpb: float | None     # None for a crash that logged no finite number
    memory_gb: float | None   # None when not a finite number
    status: str
    description: str


def _finite(value):
    return value if math.isfinite(value) else None


def parse(path):
    """Rows of one results file, numbered as experiments, and a list of "file:line: why" warnings."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")  # OSError if unreadable
    rows, warnings = [], []
    number = None  # the next experiment number, once the baseline is found
    for lineno, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        fields = line.split("\t", 4)
        spaced = len(fields) < 5
        if spaced:
            # A common slip: spaces instead of tabs. Read it, but say so.
            fields = line.split(None, 4)
        if [f.strip().lower() for f in fields[:4]] == list(HEADER[:4]):
            continue  # header
        if len(fields) < 5:
            warnings.append(f"{where}: expected 5 tab-separated columns; skipped")
            continue
        commit, val, mem, status, desc = (f.strip() for f in fields)
        status = status.lower()
        try:
            val_bpb, memory_gb = float(val), float(mem)
        except ValueError:
            warnings.append(f"{where}: val_bpb {val!r} or memory_gb {mem!r} is not a number; skipped")
            continue
        if status not in STATUSES:
            warnings.append(f"{where}: unknown status {status!r} (want {'|'.join(STATUSES)}); skipped")
            continue
        if status != "crash" and not (math.isfinite(val_bpb) and val_bpb > 0):
            warnings.append(f"{where}: status {status} with val_bpb {val}; skipped (a crash?)")
            continue
        if not math.isfinite(memory_gb):
            warnings.append(f"{where}: memory_gb {mem} is not a finite number; read as unknown")
        if spaced:
            warnings.append(f"{where}: not tab-separated, read as whitespace-separated")
        if number is None and status in ("keep", "discard"):
            number = 0  # the baseline
        n = None
        if status != "noise" and number is not None:
            n, number = number, number + 1
        rows.append(Row(n, lineno, commit, _finite(val_bpb), _finite(memory_gb), status, desc))
    return rows, warnings


# =============================================================================
# Summary
# =============================================================================

def measured_noise(rows):
    """Largest max-min of val_bpb over a commit's runs, among commits with noise reruns."""
    # One pass, grouped by commit: scanning all rows per rerun commit was quadratic.
    runs, reruns = {}, set()
    for r in rows:
        if r.status == "crash" or r.val_bpb is None:
            continue
        key = r.commit[:7]  # a short and a full hash of one commit match
        runs.setdefault(key, []).append(r.val_bpb)
        if r.status == "noise":
            reruns.add(key)
    spreads = [max(runs[k]) - min(runs[k]) for k in reruns if len(runs[k]) >= 2]
    return max(spreads) if spreads else None


def summarize(rows, path="results.tsv", noise=None, warnings=()):
    """The numbers of one results file (see the module docstring for the fields)."""
    baseline = next((r for r in rows if r.n == 0), None)
    experiments = [r for r in rows if r.n is not None and r.n > 0]
    count = {s: sum(r.status == s for r in experiments) for s in ("keep", "discard", "crash")}
    noise_source = "--noise" if noise is not None else None
    if noise is None:
        noise = measured_noise(rows)
        noise_source = "reruns" if noise is not None else None

    best, steps = baseline, []
    for r in experiments:
        if r.status != "keep":
            continue
        prev = best.val_bpb
        delta = r.val_bpb - prev
        steps.append(dict(asdict(r), prev_best=prev, delta=round(delta, 6),
                          within_noise=noise is not None and -delta < noise))
        if r.val_bpb < best.val_bpb:
            best = r

    improvement = baseline.val_bpb - best.val_bpb if baseline else None
    return {
        "path": str(path),
        "experiments": len(experiments),
        "kept": count["keep"],
        "discarded": count["discard"],
        "crashed": count["crash"],
        "crashed_before_baseline": sum(r.status == "crash" and r.n is None for r in rows),
        "noise_runs": sum(r.status == "noise" for r in rows),
        "keep_rate": count["keep"] / len(experiments) if experiments else None,
        "baseline": asdict(baseline) if baseline else None,
        "best": asdict(best) if best else None,
        "improvement": round(improvement, 6) if baseline else None,
        "improvement_pct": round(100 * improvement / baseline.val_bpb, 4) if baseline else None,
        "noise": round(noise, 6) if noise is not None else None,
        "noise_source": noise_source,
        "steps": steps,
        "top": sorted((s for s in steps if s["delta"] < 0), key=lambda s: s["delta"])[:TOP_N],
        "warnings": list(warnings),
        # Every parsed row, for the plot; left out of the JSON output.
        "_rows": rows,
    }


def load(paths, noise=None):
    """Summaries of several files; the first MAX_WARNINGS warnings of each go to stderr."""
    summaries = []
    for path in paths:
        rows, warnings = parse(path)
        for w in warnings[:MAX_WARNINGS]:
            print(f"warning: {w}", file=sys.stderr)
        if len(warnings) > MAX_WARNINGS:
            print(f"warning: {path}: {len(warnings) - MAX_WARNINGS} more not shown (--json lists them all)",
                  file=sys.stderr)
        summaries.append(summarize(rows, path, noise=noise, warnings=warnings))
    return summaries


def best_file(summaries):
    scored = [s for s in summaries if s["best"] is not None]
    return min(scored, key=lambda s: s["best"]["val_bpb"])["path"] if scored else None


def _json_safe(value):
    """value with every NaN or infinite float replaced by None: JSON has no such numbers."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def to_json(summaries):
    files = [{k: v for k, v in s.items() if not k.startswith("_")} for s in summaries]
    return _json_safe({"files": files, "best_file": best_file(summaries)})


# =============================================================================
# Text report
# =============================================================================

def _short(text, width):
    return text if len(text) <= width else text[: width - 1] + "…"


def _run(row):
    memory = f"{row['memory_gb']:.1f} GB" if row["memory_gb"] is not None else "? GB"
    return f"{row['val_bpb']:.6f}  (#{row['n']} {row['commit']}, {memory}) {row['description']}"


def report_one(s):
    lines = [f"== {s['path']} =="]
    early = s["crashed_before_baseline"]
    if s["baseline"] is None:
        lines.append(f"no successful run yet ({early} crashed)" if early else "no experiments yet")
        return "\n".join(lines)
    rate = f"{100 * s['keep_rate']:.0f}%" if s["keep_rate"] is not None else "n/a"
    lines.append(f"experiments: {s['experiments']} after the baseline  kept: {s['kept']}  "
                 f"discarded: {s['discarded']}  crashed: {s['crashed']}  keep rate: {rate}")
    extra = [f"crashed before the baseline: {early}"] if early else []
    extra += [f"noise reruns: {s['noise_runs']}"] if s["noise_runs"] else []
    if extra:
        lines.append("  ".join(extra))
    lines.append(f"baseline:    {_run(s['baseline'])}")
    lines.append(f"best:        {_run(s['best'])}")
    lines.append(f"improvement: {s['improvement']:.6f}  ({s['improvement_pct']:.2f}% of the baseline)")
    if s["noise"] is not None:
        src = "given with --noise" if s["noise_source"] == "--noise" else "max-min of reruns of one commit"
        lines.append(f"noise:       {s['noise']:.6f}  ({src})")
    if s["steps"]:
        lines.append("")
        lines.append("kept experiments (delta vs the best before it):")
        for st in s["steps"]:
            flag = "  within noise" if st["within_noise"] else ""
            if st["delta"] >= 0:
                flag += "  (not an improvement)"
            lines.append(f"  #{st['n']:<4} {st['commit']:<8} {st['val_bpb']:.6f}  {st['delta']:+.6f}  "
                         f"{_short(st['description'], 60)}{flag}")
    if s["top"]:
        lines.append("")
        lines.append(f"top {len(s['top'])} by improvement:")
        for i, st in enumerate(s["top"], start=1):
            lines.append(f"  {i}. {-st['delta']:.6f}  #{st['n']:<4} {st['commit']:<8} "
                         f"{_short(st['description'], 60)}")
    return "\n".join(lines)


def report_compare(summaries):
    header = f"{'file':<32} {'exps':>5} {'kept':>5} {'crash':>5} {'baseline':>9} {'best':>9} {'improv':>9} {'%':>6}"
    lines = ["== comparison ==", header]

    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    for s in summaries:
        base = s["baseline"]["val_bpb"] if s["baseline"] else None
        best = s["best"]["val_bpb"] if s["best"] else None
        lines.append(f"{_short(s['path'], 32):<32} {s['experiments']:>5} {s['kept']:>5} {s['crashed']:>5} "
                     f"{fmt(base, '.6f'):>9} {fmt(best, '.6f'):>9} {fmt(s['improvement'], '.6f'):>9} "
                     f"{fmt(s['improvement_pct'], '.2f'):>6}")
    winner = best_file(summaries)
    if winner:
        lines.append(f"best overall: {winner}")
    return "\n".join(lines)


def report(summaries):
    parts = [report_one(s) for s in summaries]
    if len(summaries) > 1:
        parts.append(report_compare(summaries))
    return "\n\n".join(parts)


# =============================================================================
# Plot
# =============================================================================

# How each kind of run is drawn: files differ by colour, kinds by marker.
KIND_STYLE = {
    "baseline":         dict(marker="*", s=160, zorder=4),
    "kept":             dict(marker="o", s=40, zorder=4),
    "discarded":        dict(marker="o", s=28, facecolors="none", linewidths=1.2, alpha=0.8, zorder=3),
    "discarded, above": dict(marker="^", s=36, facecolors="none", linewidths=1.2, alpha=0.8, zorder=3),
    "noise rerun":      dict(marker="D", s=18, alpha=0.7, zorder=3),
    "crash":            dict(marker="x", s=30, linewidths=1.2, alpha=0.8, zorder=3),
}
EDGE_Y = {"crash": 0.03, "discarded, above": 0.97}  # kinds drawn along an edge, in axes height


def _points(s):
    """x, y lists per kind for one file, plus the running best as a step line, in experiment numbers."""
    rows = s["_rows"]
    points = {kind: ([], []) for kind in KIND_STYLE}
    line_x, line_y, best = [], [], math.inf
    latest = {}  # commit[:7] -> the number of its latest experiment, to place its noise reruns
    for r in rows:
        if r.n is None and r.status == "noise":
            # A rerun sits on the experiment it reran, else on the latest experiment before it.
            x = latest.get(r.commit[:7], line_x[-1] if line_x else None)
            if x is not None:
                points["noise rerun"][0].append(x)
                points["noise rerun"][1].append(r.val_bpb)
            continue
        if r.n is None:
            continue  # a crash before the baseline
        latest[r.commit[:7]] = r.n
        kind = {"keep": "kept", "discard": "discarded", "crash": "crash"}[r.status]
        if r.n == 0:
            kind = "baseline"
        if kind in ("baseline", "kept"):
            best = min(best, r.val_bpb)
        line_x.append(r.n)
        line_y.append(best)
        points[kind][0].append(r.n)
        points[kind][1].append(r.val_bpb)
    return points, (line_x, line_y)


def _labels(s, limit):
    """(x, y, text) for the kept steps with the largest gains (the baseline has its own marker)."""
    steps = sorted(s["steps"], key=lambda st: st["delta"])[:limit]
    return [(st["n"], st["val_bpb"], _short(st["description"], 40)) for st in steps]


def _keep_inside(fig, ax, texts):
    """Move each label that sticks out of the axes frame back inside it."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    to_points = 72 / fig.dpi
    for t in texts:
        box = t.get_window_extent(renderer)
        dx = max(frame.x0 - box.x0, 0) + min(frame.x1 - box.x1, 0)
        dy = max(frame.y0 - box.y0, 0) + min(frame.y1 - box.y1, 0)
        if dx or dy:
            x, y = t.xyann
            t.xyann = (x + dx * to_points, y + dy * to_points)


def plot(summaries, out_path):
    """The running best per file as a step line, every run as a marker; written to out_path (folders made)."""
    # Lazily: only plotting needs matplotlib. A bare Figure on the Agg canvas touches no global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 6.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    several = len(summaries) > 1
    drawn = [(f"C{i}", s, *_points(s)) for i, s in enumerate(summaries) if s["baseline"] is not None]

    # The frame: from below the best to a little above the baseline. A wild discard (a diverged
    # change) would squash the frontier, so it is drawn on the top edge as "discarded, above".
    if drawn:
        values = [v for _, _, points, _ in drawn for kind in ("baseline", "kept", "discarded", "noise rerun")
                  for v in points[kind][1]]
        low = min(s["best"]["val_bpb"] for _, s, _, _ in drawn)
        base = max(s["baseline"]["val_bpb"] for _, s, _, _ in drawn)
        span = max(base - low, 1e-3)
        top = min(max(values), base + span) + 0.12 * span
        ax.set_ylim(low - 0.35 * span, top)  # room for the labels under the line

    texts, kinds_seen = [], set()
    for color, s, points, (line_x, line_y) in drawn:
        label = Path(s["path"]).stem if several else "running best"
        ax.step(line_x, line_y, where="post", color=color, linewidth=2, label=label, zorder=2)
        inside = [(x, y) for x, y in zip(*points["discarded"]) if y <= top]
        above = [x for x, y in zip(*points["discarded"]) if y > top]
        points["discarded"] = ([x for x, _ in inside], [y for _, y in inside])
        points["discarded, above"] = (above, [None] * len(above))
        for kind, (kx, ky) in points.items():
            if not kx:
                continue
            kinds_seen.add(kind)
            style = dict(KIND_STYLE[kind])
            style["edgecolors" if style.get("facecolors") == "none" else "color"] = color
            if kind in EDGE_Y:
                # No val_bpb to draw (a crash) or off the scale: a row of markers along an edge.
                ax.scatter(kx, [EDGE_Y[kind]] * len(kx), transform=ax.get_xaxis_transform(), gid=kind, **style)
            else:
                ax.scatter(kx, ky, gid=kind, **style)
        # Below and left of a kept point, under the running best, no run can lie: the labels go there.
        for x, y, text in _labels(s, TOP_N if several else MAX_LABELS):
            texts.append(ax.annotate(text, (x, y), xytext=(-6, -4), textcoords="offset points", ha="right",
                                     va="top", rotation=20, rotation_mode="anchor", fontsize=7, color=color))

    if not drawn:
        ax.text(0.5, 0.5, "no successful runs yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("autoresearch progress")
    elif several:
        ax.set_title("autoresearch progress")
    else:
        s = drawn[0][1]
        ax.set_title(f"autoresearch progress: {s['experiments']} experiments, {s['kept']} kept, "
                     f"val_bpb {s['baseline']['val_bpb']:.6f} -> {s['best']['val_bpb']:.6f}")
    ax.set_xlabel("experiment # (0 = baseline; noise reruns sit on the experiment they rerun)")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if drawn:
        # One entry per file (its running best), then one per kind of run, in grey when the colour means a file.
        kind_color = "0.35" if several else drawn[0][0]
        handles, _ = ax.get_legend_handles_labels()
        for kind in KIND_STYLE:
            if kind in kinds_seen:
                style = KIND_STYLE[kind]
                hollow = style.get("facecolors") == "none"
                handles.append(Line2D([], [], linestyle="none", marker=style["marker"],
                                      markersize=math.sqrt(style["s"]), color=kind_color,
                                      markerfacecolor="none" if hollow else kind_color, label=kind))
        # Outside the frame, on the right: inside it would hide the latest runs.
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, fontsize=8)
    fig.tight_layout()
    _keep_inside(fig, ax, texts)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    return fig


# =============================================================================
# Command line
# =============================================================================

def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Summarize results.tsv files of autoresearch runs.")
    parser.add_argument("tsv", nargs="*", default=["results.tsv"], help="results files (default: results.tsv)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of the text report")
    parser.add_argument("--plot", metavar="PNG",
                        help="also write a progress plot to this file (missing folders are made)")
    parser.add_argument("--noise", type=float, metavar="X",
                        help="val_bpb spread to treat as noise (default: measured from 'noise' rows)")
    args = parser.parse_args()
    if args.noise is not None and not (math.isfinite(args.noise) and args.noise >= 0):
        parser.error(f"--noise must be a spread >= 0 (a finite number), got {args.noise}")
    if args.plot:
        from matplotlib.backend_bases import FigureCanvasBase
        if args.plot.endswith(("/", os.sep)) or Path(args.plot).is_dir():
            parser.error(f"--plot {args.plot} is a folder: name the image, e.g. {Path(args.plot) / 'progress.png'}")
        suffix = Path(args.plot).suffix.lower().lstrip(".")
        formats = FigureCanvasBase.get_supported_filetypes()
        if suffix and suffix not in formats:
            parser.error(f"--plot {args.plot}: unknown image type .{suffix} (use one of: {', '.join(sorted(formats))})")
        if not suffix:
            args.plot += ".png"  # what matplotlib would write anyway: say so in "wrote ..."

    missing = [p for p in args.tsv if not Path(p).exists()]
    if missing:
        fail(f"results file not found: {', '.join(missing)}")
    try:
        summaries = load(args.tsv, noise=args.noise)
    except OSError as e:
        fail(f"cannot read {e.filename}: {e.strerror}")
    # Everything is computed before anything is printed: a plot that cannot be written leaves no half output.
    text = json.dumps(to_json(summaries), indent=2, allow_nan=False) if args.json else report(summaries)
    if args.plot:
        try:
            plot(summaries, args.plot)
        except OSError as e:
            fail(f"cannot write the plot {args.plot}: {e.strerror or e}")
    try:
        print(text)
        if args.plot:
            print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader stopped early (| head): not an error of ours, and no traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
