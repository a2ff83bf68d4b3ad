# Helpers for the device calls in this folder: sourced, never run (the callers set
# `set -euo pipefail`). Everything lives under W=/tmp/ar on the GPU machine, so a later
# call on the same warm machine finds the corpus, the caches and the run folders of an
# earlier one; logs that should come back go to $OUT (the device tool sets it; default
# ./bench_out). Runs from the repo root.

export PYTHONUNBUFFERED=1
W=/tmp/ar
REPO=$PWD
OUT=${OUT:-$REPO/bench_out}
mkdir -p "$W" "$OUT"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# wheels: the carried wheels the bench image lacks (.whl/, e.g. rustbpe), on PYTHONPATH
wheels() {
    compgen -G ".whl/*.whl" >/dev/null || return 0
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" .whl/*.whl
    export PYTHONPATH="$W/site${PYTHONPATH:+:$PYTHONPATH}"
}

# fa4_park: FA4's first half (carried as .fa4a) into /tmp, for the next call on this machine
fa4_park() { cp .fa4a/part.00 /tmp/ && log "fa4 half 1 parked in /tmp"; }

# fa4_unpack: FA4 rebuilt in /tmp/fa4 from the parked half and the one carried now (.fa4b),
# or exit 3 when this machine has no parked half (it was given back: park it again)
fa4_unpack() {
    [[ -f /tmp/part.00 ]] || { log "no /tmp/part.00: the machine was given back; run the call that parks it again"; exit 3; }
    rm -rf /tmp/fa4 && mkdir -p /tmp/fa4
    cat /tmp/part.00 .fa4b/part.01 \
        | python3 -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('/tmp/fa4')"
    log "fa4 unpacked in /tmp/fa4"
}

# fa4_path: flash-attn-4 and the CuTe DSL as fa4_unpack leaves them in /tmp/fa4
fa4_path() { export PYTHONPATH="/tmp/fa4:/tmp/fa4/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"; }

# rundir NAME SRC BUDGET: a copy of SRC's python files with TIME_BUDGET set; prints its path
rundir() {
    local d="$W/run-$1"
    rm -rf "$d" && mkdir -p "$d"
    cp "$2"/train.py "$2"/prepare.py "$2"/constants.py "$d/"
    if [[ -f "$2/runtime.py" ]]; then cp "$2/runtime.py" "$d/"; fi
    sed -i "s/^TIME_BUDGET = 300 /TIME_BUDGET = $3 /" "$d/constants.py"
    grep -q "^TIME_BUDGET = $3 " "$d/constants.py" || { log "could not set TIME_BUDGET in $d/constants.py" >&2; return 1; }
    echo "$d"
}

# prepare DIR CACHE [ARGS]: prepare.py in DIR on CACHE, log in $W. Without ARGS on a prepared
# cache it takes a second and records DIR's harness files (constants.py with its budget
# included), which the split's train.py checks before training.
prepare() {
    local dir=$1 cache=$2; shift 2
    ( cd "$dir" && AUTORESEARCH_CACHE="$cache" python3 prepare.py "$@" ) > "$W/prepare-$(basename "$dir").log" 2>&1 \
        || { tail -n 5 "$W/prepare-$(basename "$dir").log"; log "prepare.py in $dir failed"; return 1; }
    tail -n 1 "$W/prepare-$(basename "$dir").log"
}

# train NAME DIR CACHE INDUCTOR_DIR [ENV=...]: one run, log to $OUT/NAME.log, then its summary row.
# A failed run is logged and the call goes on to the next one.
train() {
    local name=$1 dir=$2 cache=$3 ind=$4; shift 4
    log "run $name ($dir, inductor $ind) $*"
    ( cd "$dir" && env AUTORESEARCH_CACHE="$cache" TORCHINDUCTOR_CACHE_DIR="$ind/inductor" TRITON_CACHE_DIR="$ind/triton" "$@" \
        timeout 400 python3 train.py ) > "$OUT/$name.log" 2>&1 || log "$name exited $?"
    python3 "$REPO/bench/calls/summ.py" "$OUT/$name.log"
}
