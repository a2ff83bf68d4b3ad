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
Implausible rows are skipped too, with the rule they break: a val_bpb below
0.01 (a slip such as 1e-300), a kept val_bpb above 16 bits per byte, and a
val_bpb above 16 next to a memory_gb that looks like one (columns swapped).
Tab columns past the fifth are reported, not merged into the description.
Lines end at '\n' only, and a BOM at the start is not read as data.

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

A night's board (spawn.sh's results/<tag>-board.tsv, see autoresearch/board.py)
is read alone, and reported as the night across its workers:

    uv run analysis.py results/mar5-board.tsv --plot frontier.png [--json]

- baseline: the board's first keep row; rows of the same commit are the
  other workers' baseline runs, not steps.
- frontier: the baseline, then each keep row that beats the night's best so
  far, in board order, with its worker and delta (the plot: over time).
- gains per worker: its experiments by status (after its baseline run) and
  its baseline and noise runs; own_gain, what its kept steps
  gained over its own best (adopted values count as its best); frontier_moves
  and frontier_gain, the new bests of the night it found and what they gained;
  adopted, how often it took another's best; adopted_from_it, how often others
  took its.
- adoptions: each adopt row, with the worker it took from and its best before.
- chain: the kept commits that are git ancestors of the best commit (found
  with git in --repo, default the board's repository), oldest first: the edits,
  from every worker, that the best is made of.
Its JSON: board, rows, minutes, baseline, best, improvement, improvement_pct,
frontier, workers, adoptions, chain (null when git cannot tell: chain_note
says why), fingerprints, warnings. Rows with implausible numbers are skipped
with the rule named, as in results files.

Functions for reuse and tests: parse(path) -> (rows, warnings),
summarize(rows, path, noise=None) -> dict, report(summaries) -> str,
to_json(summaries) -> dict, plot(summaries, out_path) -> Figure;
summarize_board(entries, path, warnings, repo) -> dict, report_board(b),
board_json(b), plot_board(b, out_path).
"""

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from autoresearch import board  # the board's format, and what a plausible val_bpb is

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


def _swapped(status, val_bpb, memory_gb):
    """The rule a row with val_bpb and memory_gb swapped breaks (a baseline so would fake a 97 % gain), or None."""
    plausible = board.MIN_PLAUSIBLE_BPB <= memory_gb <= board.MAX_PLAUSIBLE_BPB
    if status != "crash" and val_bpb > board.MAX_PLAUSIBLE_BPB and plausible:
        return (f"val_bpb and memory_gb look swapped (no val_bpb is above {board.MAX_PLAUSIBLE_BPB:g}; "
                f"{memory_gb:g} looks like one)")
    return None


def parse(path):
    """Rows of one results file, numbered as experiments, and a list of "file:line: why" warnings."""
    path = Path(path)
    rows, warnings = [], []
    number = None  # the next experiment number, once the baseline is found
    # Lines end at '\n' only: U+2028 or U+0085 inside a description do not split a row. A BOM is no data.
    for lineno, line in board.lines_of(path.read_text(encoding="utf-8-sig", errors="replace")):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        fields = line.split("\t")
        spaced = len(fields) < 5
        if spaced:
            # A common slip: spaces instead of tabs. Read it, but say so.
            fields = line.split(None, 4)
        if [f.strip().lower() for f in fields[:4]] == list(HEADER[:4]):
            continue  # header
        if len(fields) < 5:
            warnings.append(f"{where}: expected 5 tab-separated columns; skipped")
            continue
        if len(fields) > 5:
            # Not merged into the description: a stray tab would hide where a column went.
            warnings.append(f"{where}: {len(fields) - 5} extra tab-separated column(s) after the description, "
                            f"ignored: {' | '.join(fields[5:])[:80]!r}")
        commit, val, mem, status, desc = (f.strip() for f in fields[:5])
        status = status.lower()
        try:
            val_bpb, memory_gb = float(val), float(mem)
        except ValueError:
            warnings.append(f"{where}: val_bpb {val!r} or memory_gb {mem!r} is not a number; skipped")
            continue
        if status not in STATUSES:
            warnings.append(f"{where}: unknown status {status!r} (want {'|'.join(STATUSES)}); skipped")
            continue
        rule = _swapped(status, val_bpb, memory_gb) or board.implausible(status, val_bpb)
        if rule:
            warnings.append(f"{where}: status {status} with val_bpb {val}: {rule}; skipped")
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
# A night's board: the frontier across workers
# =============================================================================

def is_board(path):
    """True for a board file (spawn.sh's results/<tag>-board.tsv): its header starts time, worker, commit."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    return [c.strip().lower() for c in first.split("\t")[:3]] == list(board.COLUMNS[:3])


def _git(repo, *args, stdin=None):
    import subprocess
    out = subprocess.run(["git", "-C", str(repo), *args], input=stdin, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise OSError((out.stderr.strip().splitlines() or [f"git {args[0]} failed"])[0])
    return out.stdout


def chain_to_best(repo, best, kept):
    """The kept commits that are ancestors of the best (by git ancestry, whatever worker made them),
    oldest first, and a note when git cannot tell: (rows or None, note or None)."""
    try:
        repo = repo or _git(Path.cwd(), "rev-parse", "--show-toplevel").strip()
        asked = [row["commit"] for row in kept]
        answers = _git(repo, "cat-file", "--batch-check=%(objectname) %(objecttype)",
                       stdin="".join(f"{c}\n" for c in asked)).splitlines()
        full = {c: a.split()[0] for c, a in zip(asked, answers) if a.endswith(" commit")}
        if best["commit"] not in full:
            return None, f"commit {best['commit']} is not in {repo}: pass --repo, the repository of the night"
        order = _git(repo, "rev-list", full[best["commit"]]).split()  # newest first
    except (OSError, ValueError) as e:
        return None, f"git ancestry unavailable ({e})"
    position = {sha: i for i, sha in enumerate(order)}
    chain = sorted((row for row in kept if full.get(row["commit"]) in position),
                   key=lambda row: -position[full[row["commit"]]])
    prev = None
    for row in chain:
        row["delta"] = None if prev is None else round(row["val_bpb"] - prev, 6)
        prev = row["val_bpb"]
    return chain, None


def summarize_board(entries, path="board.tsv", warnings=(), repo=None):
    """A night's board: its frontier over time, each worker's gains, the adoptions, and the chain of kept
    edits that led to the best (see the board section of the module docstring)."""
    start = min((e.epoch for e in entries), default=0)

    def point(e, **extra):
        return dict(asdict(e), minutes=round((e.epoch - start) / 60, 3), **extra)

    first = next((e for e in entries if e.status == "keep"), None)  # the baseline: where the frontier starts
    baseline = point(first, delta=None) if first else None
    frontier, adoptions, kept, workers = [baseline] if first else [], [], {}, {}
    best = baseline
    for e in entries:
        w = workers.setdefault(e.worker, {"experiments": 0, "kept": 0, "discarded": 0, "crashed": 0, "baselines": 0,
                                          "noise_runs": 0, "own_gain": 0.0, "frontier_moves": 0, "frontier_gain": 0.0,
                                          "adopted": 0, "adopted_from_it": 0, "best": None})
        if e.status == "keep" and e.commit[:7] == first.commit[:7]:
            w["baselines"] += 1
        elif e.status == "noise":
            w["noise_runs"] += 1
        elif e.status in ("keep", "discard", "crash"):
            w["experiments"] += 1
            w[{"keep": "kept", "discard": "discarded", "crash": "crashed"}[e.status]] += 1
        if e.status not in ("keep", "adopt"):
            continue
        bar = w["best"]["val_bpb"] if w["best"] else None
        if w["best"] is None or e.val_bpb < bar:
            w["best"] = point(e)
        if e.status == "adopt":
            source = kept.get(e.commit[:7])
            adoptions.append(point(e, source=source["worker"] if source else None, previous_best=bar))
            w["adopted"] += 1
            if source:
                workers[source["worker"]]["adopted_from_it"] += 1
                source["adopted_by"].append(e.worker)
            continue
        if e.commit[:7] == first.commit[:7]:
            continue  # each worker's baseline run: the night's start, not a step
        kept.setdefault(e.commit[:7], point(e, adopted_by=[]))
        if bar is not None and e.val_bpb < bar:
            w["own_gain"] += bar - e.val_bpb
        if e.val_bpb < best["val_bpb"]:
            workers[e.worker]["frontier_moves"] += 1
            workers[e.worker]["frontier_gain"] += best["val_bpb"] - e.val_bpb
            frontier.append(point(e, delta=round(e.val_bpb - best["val_bpb"], 6)))
            best = frontier[-1]
    for w in workers.values():
        w["own_gain"], w["frontier_gain"] = round(w["own_gain"], 6), round(w["frontier_gain"], 6)
    chain, note = (None, "no kept result yet")
    if best is not None:
        rows = [dict(baseline, adopted_by=[])] + list(kept.values())
        chain, note = chain_to_best(repo, best, rows)
    fingerprints = {}
    for e in entries:
        if e.data not in ("-", ""):
            fingerprints[e.data] = fingerprints.get(e.data, 0) + 1
    warnings = list(warnings)
    if len(fingerprints) > 1:
        warnings.append(f"{path}: rows with {len(fingerprints)} data fingerprints ({', '.join(fingerprints)}): "
                        "val_bpb on different data does not compare")
    improvement = baseline["val_bpb"] - best["val_bpb"] if best else None
    return {
        "board": str(path),
        "rows": len(entries),
        "minutes": round((max(e.epoch for e in entries) - start) / 60, 3) if entries else 0,
        "baseline": baseline,
        "best": best,
        "improvement": round(improvement, 6) if best else None,
        "improvement_pct": round(100 * improvement / baseline["val_bpb"], 4) if best else None,
        "frontier": frontier,
        "workers": workers,
        "adoptions": adoptions,
        "chain": chain,
        "chain_note": note,
        "fingerprints": fingerprints,
        "warnings": warnings,
        "_entries": entries,  # for the plot; left out of the JSON output
    }


def _clock(minutes):
    seconds = int(round(minutes * 60))
    return f"+{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def report_board(b):
    lines = [f"== {b['board']}: the night's board =="]
    if b["baseline"] is None:
        lines.append(f"no kept result yet ({b['rows']} rows)")
        return "\n".join(lines)
    n = {k: sum(w[k] for w in b["workers"].values()) for k in ("experiments", "kept", "discarded", "crashed",
                                                                 "baselines")}
    lines.append(f"{len(b['workers'])} workers, {n['experiments']} experiments after {n['baselines']} baseline runs "
                 f"({n['kept']} kept, {n['discarded']} discarded, {n['crashed']} crashed), "
                 f"{len(b['adoptions'])} adoptions, {b['rows']} rows over {_clock(b['minutes'])[1:]}")
    base, best = b["baseline"], b["best"]
    lines.append(f"baseline:    {base['val_bpb']:.6f}  {base['worker']} {base['commit']}  {base['description']}")
    lines.append(f"best:        {best['val_bpb']:.6f}  {best['worker']} {best['commit']}  {best['description']}")
    lines.append(f"improvement: {b['improvement']:.6f}  ({b['improvement_pct']:.2f}% of the baseline)")
    lines += ["", "frontier (each new best of the night, with the worker that found it):"]
    for p in b["frontier"]:
        delta = f"{p['delta']:+.6f}" if p["delta"] is not None else " " * 9
        lines.append(f"  {_clock(p['minutes'])}  {p['worker']:<6} {p['commit']:<8} {p['val_bpb']:.6f}  {delta}  "
                     f"{_short(p['description'], 60)}")
    lines += ["", "gains per worker (own: its kept steps over its own best; frontier: over the night's best):",
              f"  {'worker':<8}{'exps':>6}{'kept':>6}{'disc':>6}{'crash':>6}{'own gain':>10}{'moves':>7}"
              f"{'frontier':>10}{'adopted':>9}{'taken':>7}  best"]
    for name, w in b["workers"].items():
        mine = f"{w['best']['val_bpb']:.6f} {w['best']['commit']}" if w["best"] else "-"
        lines.append(f"  {name:<8}{w['experiments']:>6}{w['kept']:>6}{w['discarded']:>6}{w['crashed']:>6}"
                     f"{w['own_gain']:>10.6f}{w['frontier_moves']:>7}{w['frontier_gain']:>10.6f}{w['adopted']:>9}"
                     f"{w['adopted_from_it']:>7}  {mine}")
    lines.append("  (moves: new bests of the night it found; adopted: times it took another's best; "
                 "taken: times others took its)")
    if b["adoptions"]:
        lines += ["", "adoptions:"]
        for a in b["adoptions"]:
            before = f"; its best was {a['previous_best']:.6f}" if a["previous_best"] is not None else ""
            lines.append(f"  {_clock(a['minutes'])}  {a['worker']} took {a['source'] or '?'}'s {a['commit']} "
                         f"({a['val_bpb']:.6f}{before})")
    lines += ["", f"best commit: {best['commit']} ({best['val_bpb']:.6f}, {best['worker']})"]
    if b["chain"] is None:
        lines.append(f"chain of kept edits: unavailable: {b['chain_note']}")
    else:
        lines.append("chain of kept edits that led to it (git ancestry, across workers, oldest first):")
        for c in b["chain"]:
            delta = f"{c['delta']:+.6f}" if c["delta"] is not None else " " * 9
            taken = f"  (adopted by {', '.join(c['adopted_by'])})" if c["adopted_by"] else ""
            lines.append(f"  {c['commit']:<8} {c['worker']:<6} {c['val_bpb']:.6f}  {delta}  "
                         f"{_short(c['description'], 50)}{taken}")
    return "\n".join(lines)


def board_json(b):
    return _json_safe({k: v for k, v in b.items() if not k.startswith("_")})


def plot_board(b, out_path):
    """The night's frontier over time (a step line, each new best labelled with its worker), every run
    as a marker coloured by worker; written to out_path (folders made)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(12, 6.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    entries, frontier = b["_entries"], b["frontier"]
    # The x axis in the unit that suits the night: seconds for a test, hours for a real night.
    unit, per_minute = ("hours", 1 / 60) if b["minutes"] > 180 else ("seconds", 60) if b["minutes"] < 2 else ("minutes", 1)
    if not frontier:
        ax.text(0.5, 0.5, "no kept result yet", ha="center", va="center", transform=ax.transAxes)
    else:
        start = min(e.epoch for e in entries)
        low, base = b["best"]["val_bpb"], b["baseline"]["val_bpb"]
        span = max(base - low, 1e-3)
        top = base + 0.5 * span
        ax.set_ylim(low - 0.3 * span, top)
        colors = {name: f"C{i}" for i, name in enumerate(b["workers"])}
        style = {"keep": dict(marker="o", s=36), "noise": dict(marker="D", s=16),
                 "discard": dict(marker="o", s=28, facecolors="none"), "adopt": dict(marker="P", s=90)}
        for e in entries:
            x = (e.epoch - start) / 60 * per_minute
            if e.status == "crash" or (e.status == "discard" and e.val_bpb > top):
                marker = "x" if e.status == "crash" else "^"
                ax.scatter([x], [0.03 if e.status == "crash" else 0.97], transform=ax.get_xaxis_transform(),
                           marker=marker, s=30, color=colors[e.worker], alpha=0.8, facecolors="none"
                           if marker == "^" else None)
            elif e.status in style:
                st = dict(style[e.status])
                st["edgecolors" if st.get("facecolors") == "none" else "color"] = colors[e.worker]
                ax.scatter([x], [e.val_bpb], zorder=4 if e.status != "discard" else 3, gid=e.status, **st)
        end = (max(e.epoch for e in entries) - start) / 60 * per_minute
        xs = [p["minutes"] * per_minute for p in frontier] + [end]
        ys = [p["val_bpb"] for p in frontier] + [frontier[-1]["val_bpb"]]
        ax.step(xs, ys, where="post", color="black", linewidth=2, zorder=2, label="the night's best")
        texts = [ax.annotate(f"{p['worker']}: {_short(p['description'], 32)}", (p["minutes"] * per_minute, p["val_bpb"]),
                             xytext=(4, -4), textcoords="offset points", va="top", rotation=-20, fontsize=7,
                             color=colors[p["worker"]]) for p in frontier[1:]]
        handles = [ax.get_legend_handles_labels()[0][0]]
        handles += [Line2D([], [], linestyle="none", marker="o", color=c, label=name) for name, c in colors.items()]
        handles += [Line2D([], [], linestyle="none", marker=m, color="0.35", markerfacecolor=f, label=label)
                    for m, f, label in (("o", "0.35", "kept"), ("o", "none", "discarded"), ("P", "0.35", "adopted"),
                                        ("x", "0.35", "crash"))]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, fontsize=8)
        ax.set_title(f"the night's frontier: {len(b['workers'])} workers, {len(b['adoptions'])} adoptions, "
                     f"val_bpb {base:.6f} -> {low:.6f}")
    ax.set_xlabel(f"{unit} since the first post")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if frontier:
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
    parser.add_argument("--repo", metavar="DIR",
                        help="a board's git repository, for the chain of kept edits (default: the board's own)")
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
        boards = [p for p in args.tsv if is_board(p)]
        if boards and len(args.tsv) > 1:
            fail(f"{boards[0]} is a board: read it alone (it holds every worker of its night)")
        if boards and args.noise is not None:
            parser.error("--noise is for results files, not a board")
        if boards:
            entries, warnings = board.read(boards[0])
            night = summarize_board(entries, boards[0], warnings, args.repo or Path(boards[0]).resolve().parent)
            for w in night["warnings"][:MAX_WARNINGS]:
                print(f"warning: {w}", file=sys.stderr)
        else:
            summaries = load(args.tsv, noise=args.noise)
    except OSError as e:
        fail(f"cannot read {e.filename}: {e.strerror}")
    # Everything is computed before anything is printed: a plot that cannot be written leaves no half output.
    if boards:
        text = json.dumps(board_json(night), indent=2, allow_nan=False) if args.json else report_board(night)
    else:
        text = json.dumps(to_json(summaries), indent=2, allow_nan=False) if args.json else report(summaries)
    if args.plot:
        try:
            plot_board(night, args.plot) if boards else plot(summaries, args.plot)
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
