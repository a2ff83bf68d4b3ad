#!/usr/bin/env bash
# Device call 3: the split with FA4 after a hyperparameter edit (both caches warm), and the
# run fitting itself to memory: the CUDA allocator capped to 40, 24, 16 and 12 GiB
# (cap.py), DEVICE_BATCH_SIZE=128 lowered until step 0 fits. All in call 2's 20 s run
# folder and its inductor cache (ind-fa2), so a cap that lands on a micro-batch no run
# compiled before pays a cold compile.
#
# Run from the repo root on the GPU machine, on the machine call 2 left warm (FA4 in
# /tmp/fa4, the run folder and caches in /tmp/ar):
#   bash bench/calls/call3_capped.sh          carry: .whl
# Logs in $OUT (5 files); a failed run is logged and the call goes on. (Recorded: the warm
# run and a first try of the caps in one call, the caps again in the next after cap.py
# learned to put the run folder on sys.path.)
set -euo pipefail
source bench/calls/lib.sh

[[ -d /tmp/fa4 && -d "$W/run-fa20" ]] || { log "no /tmp/fa4 or $W/run-fa20: the machine was given back; run calls 1 and 2 again"; exit 3; }
wheels
fa4_path
export FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=$W/fa4cache
N20=$W/run-fa20

train fa4-warm-20 "$N20" "$W/new-cache" "$W/ind-fa2"
for gib in 40 24 16 12; do
    name=cap$gib
    log "cap $gib GiB"
    ( cd "$N20" && env AUTORESEARCH_CACHE="$W/new-cache" TORCHINDUCTOR_CACHE_DIR="$W/ind-fa2/inductor" \
        TRITON_CACHE_DIR="$W/ind-fa2/triton" timeout 300 python3 "$REPO/bench/calls/cap.py" "$gib" ) \
        > "$OUT/$name.log" 2>&1 || log "$name exited $?"
    python3 bench/calls/summ.py "$OUT/$name.log"
done
log done
