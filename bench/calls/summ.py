"""
One row per train.py log: steady tokens/s and MFU, step 0, time outside the budget, summary.

    python3 bench/calls/summ.py LOG...        # e.g. the logs a device call brought back

Reads the `\r` progress lines as bench/steps.py does (medians over the timed steps, from
step 11 on) and the summary block; "outside" is total_seconds - training_seconds, what a
run costs beyond its budget. Prints the overhead and batch lines, and the first failure
lines, under each row. Works on old main's logs and the split's.
"""

import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from steps import STEP_RE, UNTIMED_STEPS  # noqa: E402  (bench/steps.py: one parser of progress lines)

SUMMARY_RE = re.compile(r"^(val_bpb|training_seconds|total_seconds|peak_vram_mb|num_steps):\s+(\S+)$", re.M)


def row(path):
    text = open(path, errors="replace").read().replace("\r", "\n")
    steps = {int(m.group(1)): (int(m.group(2)), int(m.group(3).replace(",", "")), float(m.group(4)))
             for m in STEP_RE.finditer(text)}
    timed = [v for s, v in steps.items() if s >= UNTIMED_STEPS]
    summary = dict(SUMMARY_RE.findall(text))
    overhead = re.search(r"^overhead:.*$", text, re.M)
    step0 = re.search(r"step 0[^:]*: ([\d.]+) s", text)  # "step 0: 41.7 s" (old) or "step 0 with the ...: 44.2 s"
    attention = re.search(r"^attention:\s+(\S+)", text, re.M)
    batch = re.search(r"^batch:.*$", text, re.M)
    failures = [line for line in text.splitlines() if line.startswith(("FAIL", "Traceback", "error"))]
    tok = statistics.median(v[1] for v in timed) if timed else 0
    mfu = statistics.median(v[2] for v in timed) if timed else 0
    total, training = float(summary.get("total_seconds", 0)), float(summary.get("training_seconds", 0))
    print(f"{os.path.basename(path):<22} att={attention.group(1) if attention else '?':<5} tok/s={tok:>10,.0f} "
          f"mfu={mfu:4.1f} step0={step0.group(1) if step0 else '?':>5} outside={total - training:6.1f} "
          f"total={total:6.1f} train={training:5.1f} val_bpb={summary.get('val_bpb', '?')} "
          f"peak={summary.get('peak_vram_mb', '?')} steps={summary.get('num_steps', '?')}")
    for match in (overhead, batch):
        if match:
            print("    " + match.group(0))
    for line in failures[:3]:
        print("    " + line[:300])


def main(paths):
    if not paths:
        print("usage: python3 bench/calls/summ.py LOG...", file=sys.stderr)
        return 2
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        print(f"error: no such log: {', '.join(missing)}", file=sys.stderr)
        return 1
    for path in paths:
        row(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
