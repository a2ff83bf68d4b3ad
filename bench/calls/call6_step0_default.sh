#!/usr/bin/env bash
# Device call 6, right after call 5 on the same machine:
#   new-coldind-fa4kept-20   step 0 with a cold inductor cache and FA4's disk cache kept (20 s budget)
#   new-default-300          a default run, exactly as a user starts it (TIME_BUDGET=300)
#
#   bash bench/calls/call6_step0_default.sh          carry: .bench .whl
set -euo pipefail
source bench/calls/lib.sh

[[ -d /tmp/fa4/flash_attn ]] || { log "no /tmp/fa4: the machine was given back since call 5"; exit 3; }
wheels
fa4_path
export FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=$W/fa4cache
rm -rf "$W"/ind-n20 "$W"/ind-n300
N20=$(rundir new20 . 20)
prepare "$N20" "$W/new-cache"
train new-coldind-fa4kept-20 "$N20" "$W/new-cache" "$W/ind-n20"
N300=$(rundir new300 . 300)
prepare "$N300" "$W/new-cache"
train new-default-300 "$N300" "$W/new-cache" "$W/ind-n300"
log done
