#!/usr/bin/env bash
# Device call 6, on a fresh machine (call 5 used up the machine's 30 minutes):
#   bash bench/calls/call6_step0_default.sh setup    carry: .bench .whl .fa4a
#       the corpus and caches, FA4's first half parked in /tmp
#   bash bench/calls/call6_step0_default.sh runs     carry: .bench .whl .fa4b   (at once, same machine)
#       new-default-300          a default run as a user starts it (TIME_BUDGET=300), everything cold
#       new-coldind-fa4kept-20   then step 0 with a cold inductor cache and FA4's disk cache kept
set -euo pipefail
source bench/calls/lib.sh

if [[ ${1:-} == setup ]]; then
    fa4_park
    wheels
    source bench/calls/setup.sh
    exit 0
fi
fa4_unpack
wheels
fa4_path
export FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=$W/fa4cache
rm -rf "$W/fa4cache" "$W"/ind-n20 "$W"/ind-n300
N300=$(rundir new300 . 300)
prepare "$N300" "$W/new-cache"
train new-default-300 "$N300" "$W/new-cache" "$W/ind-n300"
N20=$(rundir new20 . 20)
prepare "$N20" "$W/new-cache"
train new-coldind-fa4kept-20 "$N20" "$W/new-cache" "$W/ind-n20"
log done
