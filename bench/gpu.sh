#!/usr/bin/env bash
# GPU figures, reproducible on a machine with no network (H100 bench image).
#
#   bash bench/gpu.sh setup              # wheels, bench corpus, prepare.py --source
#   bash bench/gpu.sh loader             # fast loader tokens/s at B=128, T=2048
#   bash bench/gpu.sh train              # one default train.py run, cold compile cache
#   BUDGET=60 bash bench/gpu.sh train    # same, TIME_BUDGET shortened in a scratch copy
#   TRAIN_PY=old.py BUDGET=60 bash bench/gpu.sh train   # another version of train.py, same way
#   bash bench/gpu.sh profile [ARGS]     # compile/eval/start-up costs and a kernel profile (random tokens)
#   bash bench/gpu.sh attention [JSON|fa4 ..]  # compile + fwd/bwd time per FlexAttention kernel-options
#                                        # variant, or FA4 (`fa4`), each with cold caches
#
# Overrides: OUT (where logs go, default ./bench_out), WORK (scratch, default
# /tmp/autoresearch-bench), CORPUS_PY (default .bench/corpus.py, the bench
# corpus builder), WHEELS (default .whl: wheels missing on the machine, e.g. rustbpe),
# FA4_DIR (a folder holding flash_attn/ and nvidia_cutlass_dsl/ when flash-attn-4 is
# not installed, e.g. /tmp/fa4 as bench/calls unpacks it), FLASH_ATTENTION_CUTE_DSL_CACHE_DIR
# (FA4's kernel cache, default $WORK/fa4-cache: kept between runs, as on a machine of one's own).
set -euo pipefail

cmd=${1:-}
case "$cmd" in
setup | profile | attention | loader | train) ;;
*) sed -n '2,19p' "${BASH_SOURCE[0]}"; exit 1 ;;  # the usage header above (before the cd: the path may be relative)
esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
OUT=${OUT:-$REPO/bench_out}
WORK=${WORK:-/tmp/autoresearch-bench}
CORPUS_PY=${CORPUS_PY:-.bench/corpus.py}
WHEELS=${WHEELS:-.whl}
BUDGET=${BUDGET:-}
TRAIN_PY=${TRAIN_PY:-train.py}
FA4_DIR=${FA4_DIR:-}
export AUTORESEARCH_CACHE=${AUTORESEARCH_CACHE:-$WORK/cache}
export FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=${FLASH_ATTENTION_CUTE_DSL_CACHE_DIR:-$WORK/fa4-cache}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$WHEELS"/*.whl
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -n "$FA4_DIR" ]]; then
    [[ -d "$FA4_DIR/flash_attn" ]] || { log "FA4_DIR=$FA4_DIR has no flash_attn/"; exit 1; }
    export PYTHONPATH="$FA4_DIR:$FA4_DIR/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
fi

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
    for variant in "$@"; do
        n=$((n + 1))
        cache="$WORK/compile-cache-attention-$n-$(date +%s)"
        if [[ "$variant" == fa4 ]]; then args=(--backend fa4); else args=(--options "$variant"); fi
        TORCHINDUCTOR_CACHE_DIR="$cache/inductor" TRITON_CACHE_DIR="$cache/triton" \
            FLASH_ATTENTION_CUTE_DSL_CACHE_DIR="$cache/fa4" \
            python3 bench/attention.py "${args[@]}" 2>&1 | tee -a "$OUT/attention.log"
    done
    ;;
loader)
    python3 bench/loader.py --device cuda --B 128 --T 2048 --seconds 20 2>&1 | tee "$OUT/loader.log"
    ;;
train)
    name=$(basename "$TRAIN_PY" .py)${BUDGET:+-$BUDGET}
    run_dir="$WORK/run-$name"
    rm -rf "$run_dir" && mkdir -p "$run_dir"
    cp constants.py prepare.py runtime.py "$run_dir/"
    cp "$TRAIN_PY" "$run_dir/train.py"
    if [[ -n "$BUDGET" ]]; then
        sed -i "s/^TIME_BUDGET = 300 /TIME_BUDGET = $BUDGET /" "$run_dir/constants.py"
        grep -q "^TIME_BUDGET = $BUDGET " "$run_dir/constants.py" || { log "could not set TIME_BUDGET"; exit 1; }
    fi
    # train.py checks the harness files (constants.py, prepare.py, runtime.py) against the
    # fingerprints in the cache: record this copy's (the cache is prepared, this takes a second).
    (cd "$run_dir" && python3 prepare.py) >"$OUT/$name-prepare.log" 2>&1 \
        || { tail -n 5 "$OUT/$name-prepare.log"; log "prepare.py in $run_dir failed: run 'bash bench/gpu.sh setup' first"; exit 1; }
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
esac
