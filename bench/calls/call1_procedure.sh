#!/usr/bin/env bash
# Device call 1 (no FA4, flex for both): old main (.bench/old, c03b7ed) against the split
# (this tree), and what program.md's procedure costs outside the budget per experiment.
#
#   graph edit (cold compile caches): old = smoke preflight + run, new = the run alone
#     (the run is its own preflight); TIME_BUDGET=40
#   hyperparameter edit (warm caches): the same, TIME_BUDGET=20
#
# Run from the repo root on the GPU machine (device tool `run`, which sets $OUT):
#   bash bench/calls/call1_procedure.sh          carry: .bench .whl .fa4a
# Needs .bench/old (old main's train.py, prepare.py, constants.py:
#   mkdir -p .bench/old && for f in train.py prepare.py constants.py; do git show c03b7ed:"$f" > .bench/old/"$f"; done)
# and .bench/corpus.py (the bench corpus builder). It also parks FA4's first half
# (.fa4a/part.00) in /tmp for call 2: the two halves do not fit one carry (64 MiB).
# Logs in $OUT (7 files); a failed run is logged and the call goes on.
set -euo pipefail
source bench/calls/lib.sh

fa4_park
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
wheels
source bench/calls/setup.sh
rm -rf "$W"/ind-old "$W"/ind-oldsmoke "$W"/ind-new  # cold compile caches, also on a re-run

OLD=$(rundir old40 .bench/old 40)
NEW=$(rundir new40 . 40)
prepare "$NEW" "$W/new-cache"  # the split checks its harness files: record this copy's
# graph edit (cold compile caches): old = smoke preflight + run; new = run
train old-smoke-cold "$OLD" "$W/old-cache" "$W/ind-oldsmoke" AUTORESEARCH_SMOKE=1
train old-run-cold "$OLD" "$W/old-cache" "$W/ind-old"
train new-run-cold-flex "$NEW" "$W/new-cache" "$W/ind-new" AUTORESEARCH_ATTENTION=flex

# hyperparameter edit (warm caches)
OLD20=$(rundir old20 .bench/old 20)
NEW20=$(rundir new20 . 20)
prepare "$NEW20" "$W/new-cache"
train old-smoke-warm "$OLD20" "$W/old-cache" "$W/ind-oldsmoke" AUTORESEARCH_SMOKE=1
train old-run-warm "$OLD20" "$W/old-cache" "$W/ind-old"
train new-run-warm-flex "$NEW20" "$W/new-cache" "$W/ind-new" AUTORESEARCH_ATTENTION=flex
log done
python3 bench/calls/summ.py "$OUT"/*-cold*.log "$OUT"/*-warm*.log
