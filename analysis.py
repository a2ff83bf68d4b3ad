"""
What a night of autoresearch produced, from one or more results.tsv files.

    uv run analysis.py                          # results.tsv here: text report
    uv run analysis.py --json                   # the same, as JSON (for agents)
    uv run analysis.py --plot progress.png      # report + the running best, plotted
    uv run analysis.py --noise 0.003            # the confirmation threshold: gains up to 0.003 need confirming
    uv run analysis.py results/mar5-gpu*.tsv --plot plots/progress.png   # compare workers

A results file is the tab-separated log that program.md asks for:

    commit  val_bpb  memory_gb  status  seed  description

status is keep | discard | crash, noise for a rerun of an unchanged commit
(to measure how much val_bpb moves by chance), or confirm for a run at a
second seed that confirms a small gain (program.md's keep rule). seed is the
run's AUTORESEARCH_SEED. Files from before the seed column (five columns,
under the header without it) still read: their rows ran at seed 42. Crash rows
carry 0.000000 and 0.0. Blank lines and repeated headers are skipped;
malformed lines (too few columns, numbers that do not parse, an unknown
status, a keep/discard/noise/confirm row without a finite val_bpb > 0) are
skipped with a warning "file:line: why" on stderr. A memory_gb that is not a
finite number is read as unknown (null). Implausible rows are skipped too,
with the rule they break: a val_bpb below 0.01 (a slip such as 1e-300), a
kept val_bpb above 16 bits per byte, and a val_bpb above 16 next to a
memory_gb that looks like one (columns swapped). Tab columns past the
description are reported, not merged into it. Lines end at '\n' only, and a
BOM at the start is not read as data.

Definitions (lower val_bpb is better), numbered the way a reader counts:
- baseline: the first keep/discard row, experiment #0. It is not "kept":
  it is where the night starts.
- experiments: the keep/discard/crash rows after the baseline, numbered
  #1, #2, ... in file order. Noise and confirm runs take no number, and
  crashes before the baseline (a baseline that did not run) are counted apart.
- kept, discarded, crashed: experiments by status; they add up to
  experiments, and keep_rate = kept / experiments.
- best: the lowest val_bpb among the baseline and the kept experiments (what
  the branch holds); improvement = baseline - best, also in % of the baseline.
- paired: two runs at the same seed on the same data (one file: one data
  set), so that they start from the same initial weights where the code
  allows. Only paired runs are compared.
- noise: the rerun noise, measured: for each commit and seed with a noise
  rerun, max - min of val_bpb over the runs of that commit at that seed; the
  largest such range (null without one). Runs at other seeds never count.
- threshold: --noise X if given; else board.CONFIRM_FACTOR (3) x the noise,
  but never below board.CONFIRM_THRESHOLD (0.002, 3 x the 0.0007 rerun
  difference measured on an H100, issue 24): a rerun noise measured lower
  says nothing of how a gain varies from seed to seed, which for an
  architectural edit is far larger (docs/agents.md). threshold_source says
  which: "--noise", "reruns" or "default".
- steps: each kept experiment, with delta = val_bpb - the best before it
  (negative = better), its parent (that best's commit), paired (the same
  seed as its parent), within_noise (a gain, but not above the threshold),
  confirmations (each other seed at which both it and its parent ran: the
  mean of each, and won when it is lower) and verdict: "no gain" (delta >= 0:
  kept though not better); "confirmed" (it wins every confirmation, and has
  one); "unconfirmed" (it lost one, or it has none and its gain is not above
  the threshold, or is not paired); else "large". top: the steps sorted by
  improvement.

JSON (--json): {"files": [summary, ...], "best_file": path or null}; a summary
has path, experiments, kept, discarded, crashed, crashed_before_baseline,
noise_runs, confirm_runs, keep_rate, baseline, best, improvement,
improvement_pct, noise, noise_groups (how many commit-and-seed groups it was
measured on), threshold, threshold_source, steps, top, warnings.
baseline/best/steps/top entries are rows: {n (experiment number, 0 for the
baseline), line (in the file), commit, val_bpb, memory_gb, status,
description, seed}; steps and top add prev_best, parent, delta, paired,
within_noise, verdict and confirmations. Numbers are null where there is no
data: the output never holds NaN or Infinity.

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

The morning's confirm file (results/<tag>-confirm.tsv, written by
`bash spawn.sh confirm <tag>`, see autoresearch/confirm.py) is read alone or
with its night's board (found next to it when not given):

    uv run analysis.py results/mar5-confirm.tsv [--json]
    uv run analysis.py results/mar5-board.tsv results/mar5-confirm.tsv

- pairs: for each seed at which the baseline and the best commit both gave a
  number on the same data, their val_bpb (the mean of reruns) and gain =
  baseline - best (positive: the best is better).
- gain: the mean of those gains, their sample standard deviation (sd, null
  for one seed), min, max, and at how many seeds the best wins. This is the
  number to quote.
- night: the one-seed gain the loop saw on the board (its first keep row to
  its best keep row), for comparison: it was picked as the best of many
  draws, so it holds some luck.
Its JSON: confirm, baseline_commit, best_commit, pairs, gain, night,
no_number (runs that gave no val_bpb, with their note), warnings; with the
board, the board's JSON with this under "confirm".

Functions for reuse and tests: parse(path) -> (rows, warnings),
summarize(rows, path, noise=None) -> dict, report(summaries) -> str,
to_json(summaries) -> dict, plot(summaries, out_path) -> Figure;
summarize_board(entries, path, warnings, repo) -> dict, report_board(b),
board_json(b), plot_board(b, out_path); summarize_confirm(runs, path, warnings,
entries, board_path) -> dict, report_confirm(c).
"""

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from autoresearch import board  # the board's format, what a plausible val_bpb is, the keep rule's threshold
from autoresearch import confirm  # the morning's confirm file

HEADER = ("commit", "val_bpb", "memory_gb", "status", "seed", "description")
OLD_HEADER = ("commit", "val_bpb", "memory_gb", "status", "description")   # before the seed column: still read
STATUSES = ("keep", "discard", "crash", "noise", "confirm")
TOP_N = 5          # top hits shown in the report
MAX_WARNINGS = 10  # warnings printed per file; --json keeps them all
MAX_LABELS = 25    # kept steps labelled in the plot (the largest gains); TOP_N per file with several


# =============================================================================
# Reading results.tsv
# =============================================================================

@dataclass
class Row:
    n: int | None             # experiment number: 0 the baseline; None for noise, confirm and early crash rows
    line: int                 # line number in the file
    commit: str
    val_bpb: float | None     # None for a crash that logged no finite number
    memory_gb: float | None   # None when not a finite number
    status: str
    description: str
    seed: int | None = None   # AUTORESEARCH_SEED of the run; None in a five-column file (then 42)


def _finite(value):
    return value if math.isfinite(value) else None


def _swapped(status, val_bpb, memory_gb):
    """The rule a row with val_bpb and memory_gb swapped breaks (a baseline so would fake a 97 % gain), or None."""
    plausible = board.MIN_PLAUSIBLE_BPB <= memory_gb <= board.MAX_PLAUSIBLE_BPB
    if status != "crash" and val_bpb > board.MAX_PLAUSIBLE_BPB and plausible:
        return (f"val_bpb and memory_gb look swapped (no val_bpb is above {board.MAX_PLAUSIBLE_BPB:g}; "
                f"{memory_gb:g} looks like one)")
    return None


def _seed_column(fields):
    """True when a row without a header before it looks six-column: a seed (or '-') in the fifth column."""
    return len(fields) >= 6 and (fields[4].strip().isdigit() or fields[4].strip() == "-")


def parse(path):
    """Rows of one results file, numbered as experiments, and a list of "file:line: why" warnings."""
    path = Path(path)
    rows, warnings = [], []
    number = None  # the next experiment number, once the baseline is found
    width = None   # columns per row: 6 under the header with seed, 5 under the old header; None before a header
    # Lines end at '\n' only: U+2028 or U+0085 inside a description do not split a row. A BOM is no data.
    for lineno, line in board.lines_of(path.read_text(encoding="utf-8-sig", errors="replace")):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        fields = line.split("\t")
        if [f.strip().lower() for f in fields[:4]] == list(HEADER[:4]):
            width = 6 if len(fields) > 4 and fields[4].strip().lower() == "seed" else 5
            continue  # header
        cols = width or (6 if _seed_column(fields) else 5)
        spaced = len(fields) < cols
        if spaced:
            # A common slip: spaces instead of tabs. Read it, but say so.
            fields = line.split(None, cols - 1)
        if len(fields) < cols:
            warnings.append(f"{where}: expected {cols} tab-separated columns; skipped")
            continue
        if len(fields) > cols:
            # Not merged into the description: a stray tab would hide where a column went.
            warnings.append(f"{where}: {len(fields) - cols} extra tab-separated column(s) after the description, "
                            f"ignored: {' | '.join(fields[cols:])[:80]!r}")
        commit, val, mem, status = (f.strip() for f in fields[:4])
        seed, desc = (fields[4].strip(), fields[5].strip()) if cols == 6 else ("-", fields[4].strip())
        status = status.lower()
        try:
            val_bpb, memory_gb = float(val), float(mem)
            seed_n = None if seed in ("-", "") else int(seed)
        except ValueError:
            warnings.append(f"{where}: val_bpb {val!r}, memory_gb {mem!r} or seed {seed!r} is not a number; skipped")
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
        if status not in ("noise", "confirm") and number is not None:
            n, number = number, number + 1
        rows.append(Row(n, lineno, commit, _finite(val_bpb), _finite(memory_gb), status, desc, seed_n))
    return rows, warnings


# =============================================================================
# Summary
# =============================================================================

def _seed(row):
    """A row's seed: a five-column file's rows (no seed logged) ran at train.py's default."""
    return board.DEFAULT_SEED if row.seed is None else row.seed


def runs_by_commit(rows):
    """{commit[:7]: {seed: [val_bpb, ...]}} of every run that gave a number (a short and a full hash match)."""
    runs = {}
    for r in rows:
        if r.status != "crash" and r.val_bpb is not None:
            runs.setdefault(r.commit[:7], {}).setdefault(_seed(r), []).append(r.val_bpb)
    return runs


def measured_noise(rows, runs=None):
    """(spread, groups): the largest max-min of val_bpb among paired runs of one commit, and how many
    such groups there are. Paired: the same commit at the same seed (one file: one data set), where
    a noise rerun is one of the runs. (None, 0) without any."""
    runs = runs_by_commit(rows) if runs is None else runs
    groups = {(r.commit[:7], _seed(r)) for r in rows if r.status == "noise" and r.val_bpb is not None}
    spreads = [max(v) - min(v) for v in (runs[c][seed] for c, seed in groups) if len(v) >= 2]
    return (max(spreads), len(spreads)) if spreads else (None, 0)


def threshold_for(noise, given=None):
    """(threshold, source): the gain above which a kept step counts as large. --noise if given; else
    CONFIRM_FACTOR x the measured rerun noise, never below board.CONFIRM_THRESHOLD (a lower rerun noise
    says nothing of how a gain varies from seed to seed, far more for an architectural edit)."""
    if given is not None:
        return given, "--noise"
    if noise is not None and board.CONFIRM_FACTOR * noise > board.CONFIRM_THRESHOLD:
        return board.CONFIRM_FACTOR * noise, "reruns"
    return board.CONFIRM_THRESHOLD, "default"


def _mean(values):
    return sum(values) / len(values)


def verdict(row, parent, gain, threshold, runs):
    """How far to trust a kept step: (verdict, its pairs at other seeds). The pairs: each seed other
    than the step's at which both the step's commit and its parent's ran (confirm rows, reruns), with
    the mean of each; confirmed when the step wins every such pair and there is one."""
    mine, theirs = runs.get(row.commit[:7], {}), runs.get(parent.commit[:7], {})
    pairs = [{"seed": seed, "val_bpb": round(_mean(mine[seed]), 6), "parent": round(_mean(theirs[seed]), 6),
              "won": _mean(mine[seed]) < _mean(theirs[seed])}
             for seed in sorted(mine) if seed != _seed(row) and seed in theirs]
    if gain <= 0:
        return "no gain", pairs
    if pairs:
        return ("confirmed" if all(p["won"] for p in pairs) else "unconfirmed"), pairs
    if gain > threshold and _seed(row) == _seed(parent):
        return "large", pairs
    return "unconfirmed", pairs


def summarize(rows, path="results.tsv", noise=None, warnings=()):
    """The numbers of one results file (see the module docstring for the fields); noise: --noise."""
    baseline = next((r for r in rows if r.n == 0), None)
    experiments = [r for r in rows if r.n is not None and r.n > 0]
    count = {s: sum(r.status == s for r in experiments) for s in ("keep", "discard", "crash")}
    runs = runs_by_commit(rows)
    measured, groups = measured_noise(rows, runs)
    threshold, threshold_source = threshold_for(measured, noise)

    best, steps = baseline, []
    for r in experiments:
        if r.status != "keep":
            continue
        prev = best.val_bpb
        delta = r.val_bpb - prev
        label, pairs = verdict(r, best, -delta, threshold, runs)
        steps.append(dict(asdict(r), prev_best=prev, parent=best.commit, delta=round(delta, 6),
                          paired=_seed(r) == _seed(best), within_noise=0 < -delta <= threshold,
                          verdict=label, confirmations=pairs))
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
        "confirm_runs": sum(r.status == "confirm" for r in rows),
        "keep_rate": count["keep"] / len(experiments) if experiments else None,
        "baseline": asdict(baseline) if baseline else None,
        "best": asdict(best) if best else None,
        "improvement": round(improvement, 6) if baseline else None,
        "improvement_pct": round(100 * improvement / baseline.val_bpb, 4) if baseline else None,
        "noise": round(measured, 6) if measured is not None else None,
        "noise_groups": groups,
        "threshold": round(threshold, 6),
        "threshold_source": threshold_source,
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


VERDICTS = ("large", "confirmed", "unconfirmed", "no gain")


def threshold_text(s):
    """Where a summary's threshold came from, in words."""
    measured = (f"paired reruns here: max-min {s['noise']:.6f} over {s['noise_groups']} commit(s) at one seed"
                if s["noise"] is not None else "no paired reruns here")
    if s["threshold_source"] == "--noise":
        return "given with --noise"
    if s["threshold_source"] == "reruns":
        return f"{board.CONFIRM_FACTOR} x the rerun noise, {measured}"
    return f"the default, {board.THRESHOLD_SOURCE}; {measured}"


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
    extra += [f"confirmation runs: {s['confirm_runs']}"] if s["confirm_runs"] else []
    if extra:
        lines.append("  ".join(extra))
    lines.append(f"baseline:    {_run(s['baseline'])}")
    lines.append(f"best:        {_run(s['best'])}")
    lines.append(f"improvement: {s['improvement']:.6f}  ({s['improvement_pct']:.2f}% of the baseline)")
    lines.append(f"threshold:   {s['threshold']:.6f}  ({threshold_text(s)})")
    if s["steps"]:
        verdicts = [st["verdict"] for st in s["steps"]]
        counts = ", ".join(f"{verdicts.count(v)} {v}" for v in VERDICTS if v in verdicts)
        lines += ["", f"kept experiments ({counts}; delta vs the best before it):"]
        for st in s["steps"]:
            notes = [f"seed {p['seed']}: {p['val_bpb']:.6f} vs {p['parent']:.6f}, {'won' if p['won'] else 'lost'}"
                     for p in st["confirmations"]]
            if not st["paired"]:
                notes.append(f"not paired: its seed differs from {st['parent']}'s")
            if st["delta"] >= 0:
                notes.append("not an improvement")
            lines.append(f"  #{st['n']:<4} {st['commit']:<8} {st['val_bpb']:.6f}  {st['delta']:+.6f}  "
                         f"{st['verdict']:<11}  {_short(st['description'], 60)}"
                         + (f"  ({'; '.join(notes)})" if notes else ""))
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
                                          "noise_runs": 0, "confirm_runs": 0, "own_gain": 0.0, "frontier_moves": 0,
                                          "frontier_gain": 0.0, "adopted": 0, "adopted_from_it": 0, "best": None})
        if e.status == "keep" and e.commit[:7] == first.commit[:7]:
            w["baselines"] += 1
        elif e.status in ("noise", "confirm"):
            w[f"{e.status}_runs"] += 1
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
# The morning's confirmation: the night's gain at seeds the loop never used
# =============================================================================

def sibling_board(path):
    """results/<tag>-board.tsv next to results/<tag>-confirm.tsv, if it is there."""
    path = Path(path)
    if not path.name.endswith("-confirm.tsv"):
        return None
    other = path.with_name(path.name[: -len("-confirm.tsv")] + "-board.tsv")
    return other if other.is_file() else None


def summarize_confirm(runs, path="confirm.tsv", warnings=(), entries=None, board_path=None):
    """The night's gain over the confirm file's seeds (paired per seed: the baseline and the best at one
    seed, on one data set), next to the one-seed figure the loop saw on its board (entries), if given."""
    latest, found = confirm.pairs(runs)
    night, ends = None, confirm.night_ends(entries or ())
    if ends:
        base, best = ends["baseline"], ends["best"]
        night = {"board": str(board_path), "baseline": base.val_bpb, "best": best.val_bpb, "seed": best.seed,
                 "gain": round(base.val_bpb - best.val_bpb, 6), "best_commit": best.commit,
                 "same_commits": (base.commit[:7], best.commit[:7]) == (latest.get("baseline"), latest.get("best"))}
    return {
        "confirm": str(path),
        "baseline_commit": latest.get("baseline"),
        "best_commit": latest.get("best"),
        "pairs": found,
        "gain": confirm.gain_stats(found),
        "night": night,
        "no_number": [{"role": r.role, "commit": r.commit, "seed": r.seed, "note": r.note}
                      for r in runs if r.val_bpb is None],
        "warnings": list(warnings),
    }


def report_confirm(c):
    lines = [f"== {c['confirm']}: the night's gain at seeds the loop never used =="]
    lines.append(f"baseline {c['baseline_commit'] or '?'} vs best {c['best_commit'] or '?'}, paired seed by seed:")
    for p in c["pairs"]:
        lines.append(f"  seed {p['seed']:<5} baseline {p['baseline']:.6f}  best {p['best']:.6f}  gain {p['gain']:+.6f}")
    g, night = c["gain"], c["night"]
    if g is None:
        lines.append("  no seed has both runs yet")
    else:
        sd = f" +- {g['sd']:.6f}" if g["sd"] is not None else ""
        lines.append(f"gain:         {g['mean']:.6f}{sd}  (mean{' +- sd' if sd else ''} over {g['seeds']} seed(s); "
                     f"range {g['min']:.6f} .. {g['max']:.6f}; the best wins at {g['wins']} of {g['seeds']})")
    if night:
        lines.append(f"the loop saw: {night['gain']:.6f}  (one run each at seed {night['seed']}, {night['board']}; "
                     "the best of the night's picks, so some of it is luck)")
        if not night["same_commits"]:
            lines.append(f"  note: the board's best is {night['best_commit']}, not the commit confirmed here")
    if g is not None:
        sd = f" +- {g['sd']:.4f}" if g["sd"] is not None else ""
        lines.append(f"quote:        {g['mean']:.4f}{sd} val_bpb over {g['seeds']} seed(s)")
    if c["no_number"]:
        lines.append(f"runs without a number: {len(c['no_number'])} (" + "; ".join(
            f"{r['role']} seed {r['seed']}: {r['note']}" for r in c["no_number"][:3]) + ")")
    return "\n".join(lines)


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
                        help="the confirmation threshold: kept gains up to X are 'unconfirmed' unless confirmed "
                             f"(default: {board.CONFIRM_FACTOR} x the rerun noise of 'noise' rows, at least "
                             f"{board.CONFIRM_THRESHOLD})")
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
        confirms = [p for p in args.tsv if confirm.is_confirm_file(p)]
        if confirms and (len(confirms) > 1 or len(args.tsv) > 1 + len(boards) or len(boards) > 1):
            fail(f"{confirms[0]} is a confirm file: read it alone, or with its night's board")
        if boards and len(args.tsv) > 1 and not confirms:
            fail(f"{boards[0]} is a board: read it alone (it holds every worker of its night)")
        if (boards or confirms) and args.noise is not None:
            parser.error("--noise is for results files, not a board or a confirm file")
        if confirms and not boards and args.plot:
            parser.error("--plot draws a board or results files: a confirm file has no plot")
        night = morning = None
        if boards:
            entries, warnings = board.read(boards[0])
            night = summarize_board(entries, boards[0], warnings, args.repo or Path(boards[0]).resolve().parent)
            for w in night["warnings"][:MAX_WARNINGS]:
                print(f"warning: {w}", file=sys.stderr)
        if confirms:
            runs, warnings = confirm.read(confirms[0])
            board_path = boards[0] if boards else sibling_board(confirms[0])
            entries = board.read(board_path)[0] if board_path else None
            morning = summarize_confirm(runs, confirms[0], warnings, entries, board_path)
            for w in warnings[:MAX_WARNINGS]:
                print(f"warning: {w}", file=sys.stderr)
        if not boards and not confirms:
            summaries = load(args.tsv, noise=args.noise)
    except OSError as e:
        fail(f"cannot read {e.filename}: {e.strerror}")
    # Everything is computed before anything is printed: a plot that cannot be written leaves no half output.
    if boards or confirms:
        if args.json:
            data = dict(board_json(night), confirm=morning) if night and morning else board_json(night or morning)
            text = json.dumps(_json_safe(data), indent=2, allow_nan=False)
        else:
            parts = ([report_board(night)] if night else []) + ([report_confirm(morning)] if morning else [])
            text = "\n\n".join(parts)
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
