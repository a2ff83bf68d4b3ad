#!/usr/bin/env bash
# Device call 4 (issue 12, "the rest of the step"): the corpus and both caches, FA4's first
# half parked in /tmp for call 5, the fused kernels' GPU tests, and the kernels against
# torch.compile's version of their plain definitions (bench/calls/fused_bench.py: errors,
# time of forward + backward, extra memory, and the tile settings tried).
#
# Run from the repo root on the GPU machine:
#   bash bench/calls/call4_fused_setup.sh          carry: .bench .whl .fa4a
# Logs in $OUT; then call 5 at once, on the same warm machine.
set -euo pipefail
source bench/calls/lib.sh

fa4_park
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
wheels
source bench/calls/setup.sh
( timeout 240 python3 -m pytest tests/test_fused.py -q -p no:cacheprovider > "$OUT/gpu-fused-tests.log" 2>&1 ) \
    || log "fused tests exited $?"
tail -n 2 "$OUT/gpu-fused-tests.log"
( TRITON_CACHE_DIR=$W/triton-fb timeout 300 python3 bench/calls/fused_bench.py "$OUT/fused_bench.json" ) \
    > "$OUT/fused_bench.log" 2>&1 || { log "fused_bench exited $?"; tail -n 20 "$OUT/fused_bench.log"; }
log done
