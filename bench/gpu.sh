#!/usr/bin/env bash
# GPU figures, reproducible on a machine with no network (H100 bench image).
#
#   bash bench/gpu.sh setup              # wheels, bench corpus, prepare.py --source
#   bash bench/gpu.sh loader             # fast loader tokens/s at B=128, T=2048
#   bash bench/gpu.sh train              # one default train.py run, cold compile cache
#   BUDGET=60 bash bench/gpu.sh train    # same, TIME_BUDGET shortened in a scratch copy
#   TRAIN_PY=old.py BUDGET=60 bash bench/gpu.sh train   # another version of train.py, same way
#   bash bench/gpu.sh profile [ARGS]     # compile/eval/start-up costs and a kernel profile (random tokens)
#   bash bench/gpu.sh attention [JSON..] # FlexAttention compile + fwd/bwd time per kernel-options variant
#
# Overrides: OUT (where logs go, default ./bench_out), WORK (scratch, default
# /tmp/autoresearch-bench), CORPUS_PY (default .bench/corpus.py, the bench
# corpus builder), WHEELS (default .whl: wheels missing on the machine, e.g. rustbpe).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
OUT=${OUT:-$REPO/bench_out}
WORK=${WORK:-/tmp/autoresearch-bench}
CORPUS_PY=${CORPUS_PY:-.bench/corpus.py}
WHEELS=${WHEELS:-.whl}
BUDGET=${BUDGET:-}
TRAIN_PY=${TRAIN_PY:-train.py}
export AUTORESEARCH_CACHE=${AUTORESEARCH_CACHE:-$WORK/cache}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$WHEELS"/*.whl
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi

cmd=${1:-}
case "$cmd" in
setup)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
    log "building the bench corpus"
    /usr/bin/time -f "corpus: %e s" python3 "$CORPUS_PY" "$WORK/corpus" --max-doc-chars 6000 --max-chars 1e9 \
        >"$OUT/corpus.log" 2>&1
    tail -n 3 "$OUT/corpus.log"
    log "prepare.py --source"
    /usr/bin/time -f "prepare: %e s" python3 prepare.py --source "$WORK/corpus" 2>&1 | tee "$OUT/prepare.log"
    ;;
profile)
    shift
    cache="$WORK/compile-cache-$(date +%s)"
    TORCHINDUCTOR_CACHE_DIR="$cache/inductor" TRITON_CACHE_DIR="$cache/triton" \
        python3 bench/step_profile.py "$@" 2>&1 | tee -a "$OUT/profile.log"
    ;;
attention)
    shift
    [[ $# -gt 0 ]] || set -- '{}'
    n=0
    for options in "$@"; do
        n=$((n + 1))
        cache="$WORK/compile-cache-attention-$n-$(date +%s)"
        TORCHINDUCTOR_CACHE_DIR="$cache/inductor" TRITON_CACHE_DIR="$cache/triton" \
            python3 bench/attention.py --options "$options" 2>&1 | tee -a "$OUT/attention.log"
    done
    ;;
loader)
    python3 bench/loader.py --device cuda --B 128 --T 2048 --seconds 20 2>&1 | tee "$OUT/loader.log"
    ;;
train)
    name=$(basename "$TRAIN_PY" .py)${BUDGET:+-$BUDGET}
    run_dir="$WORK/run-$name"
    rm -rf "$run_dir" && mkdir -p "$run_dir"
    cp constants.py prepare.py "$run_dir/"
    cp "$TRAIN_PY" "$run_dir/train.py"
    if [[ -n "$BUDGET" ]]; then
        sed -i "s/^TIME_BUDGET = 300 /TIME_BUDGET = $BUDGET /" "$run_dir/constants.py"
        grep -q "^TIME_BUDGET = $BUDGET " "$run_dir/constants.py" || { log "could not set TIME_BUDGET"; exit 1; }
    fi
    # A cold compile cache, as after every agent edit: fresh inductor and triton caches.
    cache="$WORK/compile-cache-$(date +%s)"
    export TORCHINDUCTOR_CACHE_DIR="$cache/inductor" TRITON_CACHE_DIR="$cache/triton"
    log "$TRAIN_PY in $run_dir (budget ${BUDGET:-300} s, cold compile cache)"
    set +e
    (cd "$run_dir" && python3 train.py) >"$OUT/$name.log" 2>&1
    rc=$?
    set -e
    python3 bench/steps.py "$OUT/$name.log" || true
    tail -c 1500 "$OUT/$name.log" | tr '\r' '\n' | tail -n 25
    log "train.py exit code $rc"
    exit "$rc"
    ;;
*)
    sed -n '2,13p' "${BASH_SOURCE[0]}"
    exit 1
    ;;
esac
