"""
Step-time statistics from a train.py log (the `\r` progress lines).

    python3 bench/steps.py run.log

Prints step 0's time (compile), the median and 99th-percentile step time over
the timed steps (after the 11 warm-up steps), steady tokens/s and MFU (medians),
then the summary block. Used by bench/gpu.sh; works on any train.py log.
"""

import re
import statistics
import sys

STEP_RE = re.compile(r"step (\d+) .*?dt: (\d+)ms \| tok/sec: ([\d,]+) \| mfu: ([\d.]+)%")
UNTIMED_STEPS = 11


def main(path):
    text = open(path, errors="replace").read().replace("\r", "\n")
    steps = {}
    for m in STEP_RE.finditer(text):
        steps[int(m.group(1))] = (int(m.group(2)), int(m.group(3).replace(",", "")), float(m.group(4)))
    if not steps:
        print(f"{path}: no step lines")
        return 1
    timed = [v for s, v in sorted(steps.items()) if s >= UNTIMED_STEPS]
    # train.py prints no progress line for step 0 (it runs while fitting to memory): its time is on the
    # `overhead:` line; logs of older versions have a `step 00000` progress line instead
    step0 = re.search(r"\(step 0[^:]*: ([\d.]+) s\)", text)
    print(f"step 0 (compile): {float(step0.group(1)) if step0 else steps[min(steps)][0] / 1000:.1f} s")
    warm = sum(v[0] for s, v in steps.items() if s < UNTIMED_STEPS) / 1000
    print(f"warm-up steps 0..{UNTIMED_STEPS - 1}: {warm:.1f} s")
    if len(timed) >= 2:
        dts = sorted(v[0] for v in timed)
        p99 = dts[min(len(dts) - 1, int(round(0.99 * (len(dts) - 1))))]
        med = statistics.median(dts)
        print(f"timed steps: {len(timed)}  median {med:.0f} ms  p99 {p99} ms  (p99/median {p99 / med:.3f})")
        print(f"steady tokens/s (median): {statistics.median(v[1] for v in timed):,.0f}")
        print(f"steady MFU (median): {statistics.median(v[2] for v in timed):.1f}%")
    for line in text.splitlines():
        if line.startswith(("attention:", "device:", "---")) or re.match(r"^[a-z_]+:\s+[\d.]+$", line):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
