#!/usr/bin/env bash
# Device call 5 (issue 12's goals), right after call 4 on the same machine: FA4 rebuilt in
# /tmp/fa4, the GPU attention tests, then side by side at a 60 s budget, cold inductor caches:
#   new-60           this tree as a user runs it: FA4 + the fused kernels (FA4's disk cache cold)
#   old-flex-60      old main (c03b7ed, .bench/old): FlexAttention, no fused kernels
#   new-unfused-60   this tree with AUTORESEARCH_FUSED=0: FA4 alone
#
#   bash bench/calls/call5_fused_goals.sh          carry: .bench .whl .fa4b
set -euo pipefail
source bench/calls/lib.sh

fa4_unpack
wheels
fa4_path
source bench/calls/setup.sh
export FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=$W/fa4cache
rm -rf "$W/fa4cache" "$W"/ind-n60 "$W"/ind-o60 "$W"/ind-u60

( timeout 200 python3 -m pytest tests/test_runtime.py tests/test_fused.py -q -x -k "attention or fa4 or gpu or compile" \
    -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1 ) || log "GPU tests exited $?"
tail -n 2 "$OUT/gpu-tests.log"

N60=$(rundir new60 . 60)
prepare "$N60" "$W/new-cache"
O60=$(rundir old60 .bench/old 60)
train new-60 "$N60" "$W/new-cache" "$W/ind-n60"
train old-flex-60 "$O60" "$W/old-cache" "$W/ind-o60"
train new-unfused-60 "$N60" "$W/new-cache" "$W/ind-u60" AUTORESEARCH_FUSED=0
log done
