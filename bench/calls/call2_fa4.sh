#!/usr/bin/env bash
# Device call 2: FA4 against old main's flex, equal budget. FA4 is rebuilt in /tmp/fa4 from
# the half call 1 parked in /tmp and the second half carried now; then the GPU attention
# tests (fa4 and flex against the float64 reference), and three runs:
#   fa4-cold-cold-60         the split, FA4 by default, cold inductor and cold FA4 cache, 60 s
#   old-flex-cold-60         old main (flex), cold inductor cache, 60 s
#   fa4-coldind-fa4kept-20   the split, cold inductor cache, FA4's disk cache kept, 20 s
# and the size of FA4's disk cache.
#
# Run from the repo root on the GPU machine, on the machine call 1 left warm:
#   bash bench/calls/call2_fa4.sh          carry: .bench .whl .fa4b
# Logs in $OUT (4 files); a failed run is logged and the call goes on.
set -euo pipefail
source bench/calls/lib.sh

fa4_unpack
wheels
fa4_path
source bench/calls/setup.sh

( timeout 200 python3 -m pytest tests/test_runtime.py -q -x -k attention -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1 ) \
    || log "GPU attention tests exited $?"
tail -n 2 "$OUT/gpu-tests.log"

export FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=$W/fa4cache
rm -rf "$W/fa4cache" "$W"/ind-fa1 "$W"/ind-fa2 "$W"/ind-old60  # cold caches, also on a re-run
N60=$(rundir fa60 . 60)
prepare "$N60" "$W/new-cache"
O60=$(rundir old60 .bench/old 60)
train fa4-cold-cold-60 "$N60" "$W/new-cache" "$W/ind-fa1"
train old-flex-cold-60 "$O60" "$W/old-cache" "$W/ind-old60"
N20=$(rundir fa20 . 20)
prepare "$N20" "$W/new-cache"
train fa4-coldind-fa4kept-20 "$N20" "$W/new-cache" "$W/ind-fa2"
du -sh "$W/fa4cache" || log "no FA4 cache in $W/fa4cache"
log done
