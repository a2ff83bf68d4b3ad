"""
What a night of autoresearch produced, from one or more results.tsv files.

    uv run analysis.py                          # results.tsv here: text report
    uv run analysis.py --json                   # the same, as JSON (for agents)
    uv run analysis.py --plot progress.png      # report + the running best, plotted
    uv run analysis.py --noise 0.002            # improvements under 0.002 are "within noise"
    uv run analysis.py results/mar5-gpu*.tsv --plot progress.png   # compare workers

A results file is the five-column, tab-separated log that program.md asks for:

    commit  val_bpb  memory_gb  status  description

status is keep | discard | crash, or noise for a rerun of an unchanged commit
(to measure how much val_bpb moves by chance). Crash rows carry 0.000000 and
0.0. Blank lines and repeated headers are skipped; malformed lines (too few
columns, numbers that do not parse, an unknown status, a keep/discard row
without a val_bpb) are skipped with a warning "file:line: why" on stderr.

Definitions (lower val_bpb is better):
- experiments: keep + discard + crash rows (noise reruns are counted apart).
- baseline: the first keep/discard row. Every later keep is a change.
- best: the lowest val_bpb among the baseline and the kept rows (what the
  branch holds); improvement = baseline - best, also in % of the baseline.
- keep_rate: kept changes / experiments after the baseline.
- steps: each kept row after the baseline, with delta = val_bpb - the best
  before it (negative = better); top: the steps sorted by improvement.
- noise: --noise X if given, else the spread measured from noise rows: for
  each commit with noise reruns, max - min of val_bpb over all its non-crash
  rows (the original run and the reruns); the largest such range. A step whose
  improvement is smaller than the noise is flagged within_noise.

JSON (--json): {"files": [summary, ...], "best_file": path or null}; a summary
has path, experiments, kept, discarded, crashed, noise_runs, keep_rate,
baseline, best, improvement, improvement_pct, noise, noise_source
("--noise" | "reruns" | null), steps, top, warnings. baseline/best/steps/top
entries are rows: {n (1-based position among the file's parsed rows),
commit, val_bpb, memory_gb, status, description}; steps and top add
prev_best, delta and within_noise. Numbers are null where there is no data.

Functions for reuse and tests: parse(path) -> (rows, warnings),
summarize(rows, path, noise=None) -> dict, report(summaries) -> str,
plot(summaries, out_path).
"""

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

HEADER = ("commit", "val_bpb", "memory_gb", "status", "description")
STATUSES = ("keep", "discard", "crash", "noise")
TOP_N = 5  # top hits shown in the report


# =============================================================================
# Reading results.tsv
# =============================================================================

@dataclass
class Row:
    n: int            # 1-based position among the file's parsed rows
    commit: str
    val_bpb: float
    memory_gb: float
    status: str
    description: str


def parse(path):
    """Rows of one results file and a list of "file:line: why" warnings."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")  # FileNotFoundError if missing
    rows, warnings = [], []
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
        if spaced:
            warnings.append(f"{where}: not tab-separated, read as whitespace-separated")
        rows.append(Row(len(rows) + 1, commit, val_bpb, memory_gb, status, desc))
    return rows, warnings


# =============================================================================
# Summary
# =============================================================================

def measured_noise(rows):
    """Largest max-min of val_bpb over a commit's runs, among commits with noise reruns."""
    reruns = {r.commit[:7] for r in rows if r.status == "noise"}
    spread = None
    for commit in sorted(reruns):
        vals = [r.val_bpb for r in rows if r.commit[:7] == commit and r.status != "crash"]
        if len(vals) >= 2:
            spread = max(spread or 0.0, max(vals) - min(vals))
    return spread


def summarize(rows, path="results.tsv", noise=None, warnings=()):
    """The numbers of one results file (see the module docstring for the fields)."""
    experiments = [r for r in rows if r.status != "noise"]
    count = {s: sum(r.status == s for r in experiments) for s in ("keep", "discard", "crash")}
    noise_source = "--noise" if noise is not None else None
    if noise is None:
        noise = measured_noise(rows)
        noise_source = "reruns" if noise is not None else None

    baseline = next((r for r in experiments if r.status in ("keep", "discard")), None)
    best, steps = baseline, []
    if baseline is not None:
        for r in experiments:
            if r.n <= baseline.n or r.status != "keep":
                continue
            prev = best.val_bpb
            delta = r.val_bpb - prev
            steps.append(dict(asdict(r), prev_best=prev, delta=round(delta, 6),
                              within_noise=noise is not None and -delta < noise))
            if r.val_bpb < best.val_bpb:
                best = r

    after = [r for r in experiments if baseline is not None and r.n > baseline.n]
    kept_after = sum(r.status == "keep" for r in after)
    improvement = baseline.val_bpb - best.val_bpb if baseline else None
    return {
        "path": str(path),
        "experiments": len(experiments),
        "kept": count["keep"],
        "discarded": count["discard"],
        "crashed": count["crash"],
        "noise_runs": sum(r.status == "noise" for r in rows),
        "keep_rate": kept_after / len(after) if after else None,
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
        "_rows": [asdict(r) for r in rows],
    }


def load(paths, noise=None):
    """Summaries of several files; warnings go to stderr."""
    summaries = []
    for path in paths:
        rows, warnings = parse(path)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        summaries.append(summarize(rows, path, noise=noise, warnings=warnings))
    return summaries


def best_file(summaries):
    scored = [s for s in summaries if s["best"] is not None]
    return min(scored, key=lambda s: s["best"]["val_bpb"])["path"] if scored else None


def to_json(summaries):
    files = [{k: v for k, v in s.items() if not k.startswith("_")} for s in summaries]
    return {"files": files, "best_file": best_file(summaries)}


# =============================================================================
# Text report
# =============================================================================

def _short(text, width):
    return text if len(text) <= width else text[: width - 1] + "…"


def report_one(s):
    lines = [f"== {s['path']} =="]
    if s["experiments"] == 0:
        lines.append("no experiments yet")
        return "\n".join(lines)
    rate = f"{100 * s['keep_rate']:.0f}%" if s["keep_rate"] is not None else "n/a"
    lines.append(f"experiments: {s['experiments']}  kept: {s['kept']}  discarded: {s['discarded']}  "
                 f"crashed: {s['crashed']}  keep rate: {rate} (of changes after the baseline)")
    if s["noise_runs"]:
        lines.append(f"noise reruns: {s['noise_runs']}")
    base, best = s["baseline"], s["best"]
    if base is None:
        lines.append("no successful run yet (all crashed)")
        return "\n".join(lines)
    lines.append(f"baseline:    {base['val_bpb']:.6f}  ({base['commit']}, {base['memory_gb']:.1f} GB) {base['description']}")
    lines.append(f"best:        {best['val_bpb']:.6f}  ({best['commit']}, {best['memory_gb']:.1f} GB) {best['description']}")
    lines.append(f"improvement: {s['improvement']:.6f}  ({s['improvement_pct']:.2f}% of the baseline)")
    if s["noise"] is not None:
        src = "given with --noise" if s["noise_source"] == "--noise" else "max-min of reruns of one commit"
        lines.append(f"noise:       {s['noise']:.6f}  ({src})")
    if s["steps"]:
        lines.append("")
        lines.append("kept steps (delta vs the best before it):")
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
            lines.append(f"  {i}. {-st['delta']:.6f}  {st['commit']:<8} {_short(st['description'], 60)}")
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

def plot(summaries, out_path):
    """The running best per file as a step line, kept runs annotated, discards faint."""
    import matplotlib  # lazily: only plotting needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 6.5))
    tops, bottoms, highs = [], [], []
    for i, s in enumerate(summaries):
        color = f"C{i}"
        label = Path(s["path"]).stem if len(summaries) > 1 else "running best"
        rows = [r for r in s["_rows"] if r["status"] != "noise"]
        base = s["baseline"]
        if base is None:
            continue
        ok = [r for r in rows if r["status"] != "crash" and r["n"] >= base["n"]]
        # Running best over the baseline and kept rows, held flat to the last run.
        xs, ys, best = [], [], math.inf
        for r in ok:
            if r["n"] == base["n"] or r["status"] == "keep":
                best = min(best, r["val_bpb"])
            xs.append(r["n"])
            ys.append(best)
        ax.step(xs, ys, where="post", color=color, linewidth=2, label=label)
        disc = [r for r in ok if r["status"] == "discard" and r["n"] != base["n"]]
        ax.scatter([r["n"] for r in disc], [r["val_bpb"] for r in disc], s=12, color=color, alpha=0.2)
        kept = [r for r in ok if r["n"] == base["n"] or r["status"] == "keep"]
        ax.scatter([r["n"] for r in kept], [r["val_bpb"] for r in kept], s=30, color=color, zorder=3)
        for r in kept:
            ax.annotate(_short(r["description"], 40), (r["n"], r["val_bpb"]), xytext=(4, 6),
                        textcoords="offset points", fontsize=7, rotation=20, color=color)
        tops.append(base["val_bpb"])
        highs.append(max(r["val_bpb"] for r in ok))
        bottoms.append(s["best"]["val_bpb"])
    if tops:
        # Keep the frontier readable: wild discards (a diverged change) go off the top.
        span = max(max(tops) - min(bottoms), 1e-3)
        ax.set_ylim(min(bottoms) - 0.15 * span, min(max(highs), max(tops) + span) + 0.1 * span)
    else:
        ax.text(0.5, 0.5, "no successful runs yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("experiment #")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title("autoresearch progress")
    ax.grid(alpha=0.3)
    if tops:
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


# =============================================================================
# Command line
# =============================================================================

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Summarize results.tsv files of autoresearch runs.")
    parser.add_argument("tsv", nargs="*", default=["results.tsv"], help="results files (default: results.tsv)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of the text report")
    parser.add_argument("--plot", metavar="PNG", help="also write a progress plot to this file")
    parser.add_argument("--noise", type=float, metavar="X",
                        help="val_bpb spread to treat as noise (default: measured from 'noise' rows)")
    args = parser.parse_args()
    if args.noise is not None and not args.noise >= 0:
        parser.error(f"--noise must be a spread >= 0, got {args.noise}")

    missing = [p for p in args.tsv if not Path(p).is_file()]
    if missing:
        print(f"error: results file not found: {', '.join(missing)}", file=sys.stderr)
        sys.exit(1)
    summaries = load(args.tsv, noise=args.noise)
    if args.json:
        print(json.dumps(to_json(summaries), indent=2))
    else:
        print(report(summaries))
    if args.plot:
        plot(summaries, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
