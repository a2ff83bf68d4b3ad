#!/usr/bin/env bash
# GPU benchmarks on your own machine: how fast a run trains, and what an experiment
# costs outside its 5-minute budget. Run `uv sync` first; nothing here needs the network
# except `setup` without SOURCE.
#
# Usage:
#   bash bench/gpu.sh COMMAND [ARGS]
#
# Examples:
#   bash bench/gpu.sh setup                    # data for the benchmarks, in a cache of their own (downloads)
#   SOURCE=~/corpus bash bench/gpu.sh setup    # ... or your own files, offline (prepare.py --source)
#   bash bench/gpu.sh train                    # one default run (300 s), cold compile cache, as after a model edit
#   BUDGET=60 bash bench/gpu.sh train          # the same with TIME_BUDGET=60, in a scratch copy
#   TRAIN_PY=my_train.py NAME=mine BUDGET=60 bash bench/gpu.sh train   # another train.py, same way
#   AUTORESEARCH_ATTENTION=flex NAME=flex BUDGET=60 bash bench/gpu.sh train   # train.py's settings pass through
#   bash bench/gpu.sh overhead                 # time outside the budget: cold caches, a hyperparameter edit, two model edits
#   bash bench/gpu.sh compare                  # FA4 + fused kernels, FA4 alone, flex alone: 60 s each, cold compiles
#   bash bench/gpu.sh compare default flex     # ... only the variants named (default, unfused, flex)
#   bash bench/gpu.sh capped 40 24 16 12       # GPU memory capped to N GiB: the micro-batch the run fits, its speed
#   bash bench/gpu.sh fused                    # the fused kernels against compiled plain PyTorch (bench/fused.py)
#   bash bench/gpu.sh loader                   # the fast loader's tokens/s at B=128, T=2048, on CUDA
#   bash bench/gpu.sh profile [ARGS]           # compile, optimizer and evaluation costs, top kernels (bench/step_profile.py)
#   bash bench/gpu.sh attention ['{}' fa4 ..]  # compile + fwd/bwd time per FlexAttention kernel-options variant, or FA4
#
# Runs of train.py happen in a scratch copy ($WORK/run-NAME: the harness, TRAIN_PY, the
# copy's TIME_BUDGET) on the bench cache, never on yours: each copy records its own
# fingerprints there, as train.py checks them. Logs land in $BENCH_OUT, one per run, each
# followed by its step statistics (bench/steps.py). Safe to re-run.
#
# Overrides (environment):
#   BENCH_OUT=bench_out             logs (in the repo)
#   WORK=/tmp/autoresearch-bench    scratch: the bench cache, run copies, compile caches
#   SOURCE=                         setup: import these files (prepare.py --source) instead of downloading
#   BUDGET=                         TIME_BUDGET in seconds (default: train 300, compare 60, overhead and capped 20)
#   TRAIN_PY=train.py               the train.py to run
#   NAME=                           train: the log's name (default: TRAIN_PY's name and the budget)
#   PYTHON=.venv/bin/python         the interpreter (python3 when there is no .venv)
#   WHEELS=                         a folder of wheels to put on PYTHONPATH (a machine without uv's environment)
#   FA4_DIR=                        a folder holding flash_attn/ and nvidia_cutlass_dsl/, when flash-attn-4 is not installed
#   FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=$WORK/fa4-cache   FA4's kernel cache: kept between runs, as on your machine
set -euo pipefail
shopt -s inherit_errexit  # a failing command inside $(...) stops it too

SCRIPT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
usage() { sed -n '2,/^set -euo pipefail$/p' "$SCRIPT" | sed -e '$d' -e 's/^# \{0,1\}//'; }

cmd=${1:-}
case "$cmd" in
setup | train | overhead | compare | capped | fused | loader | profile | attention) shift ;;
help | -h | --help) usage; exit 0 ;;
*) usage >&2; exit 1 ;;
esac

# paths given relative to where you ran it, before the cd to the repo
absolute() { if [[ "$1" == /* ]]; then printf '%s\n' "$1"; else printf '%s\n' "$PWD/$1"; fi; }
for var in TRAIN_PY BENCH_OUT SOURCE WHEELS FA4_DIR WORK; do
    if [[ -n "${!var:-}" ]]; then printf -v "$var" '%s' "$(absolute "${!var}")"; fi
done
cd "$(dirname "$SCRIPT")/.."
REPO=$PWD
TRAIN_PY=${TRAIN_PY:-$REPO/train.py}
BENCH_OUT=${BENCH_OUT:-$REPO/bench_out}
SOURCE=${SOURCE:-}
WHEELS=${WHEELS:-}
FA4_DIR=${FA4_DIR:-}
WORK=${WORK:-/tmp/autoresearch-bench}
BUDGET=${BUDGET:-}
NAME=${NAME:-}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
export AUTORESEARCH_CACHE=$WORK/cache   # the bench's own cache, whatever yours is
export FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=${FLASH_ATTENTION_CUTE_DSL_CACHE_DIR:-$WORK/fa4-cache}
export PYTHONUNBUFFERED=1
mkdir -p "$BENCH_OUT" "$WORK"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [[ -n "$WHEELS" ]]; then
    compgen -G "$WHEELS/*.whl" >/dev/null || { log "WHEELS=$WHEELS holds no .whl files"; exit 1; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$WHEELS"/*.whl
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -n "$FA4_DIR" ]]; then
    [[ -d "$FA4_DIR/flash_attn" ]] || { log "FA4_DIR=$FA4_DIR has no flash_attn/"; exit 1; }
    export PYTHONPATH="$FA4_DIR:$FA4_DIR/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
fi

# run_copy NAME BUDGET [EDIT]: a scratch copy of the harness and TRAIN_PY with TIME_BUDGET=BUDGET
# (and EDIT, a sed expression, applied to its train.py), its fingerprints recorded in the bench
# cache (a second on a prepared cache); prints its path
run_copy() {
    local dir="$WORK/run-$1" budget=$2 edit=${3:-}
    rm -rf "$dir" && mkdir -p "$dir"
    cp constants.py prepare.py "$dir/"
    cp -R autoresearch "$dir/"
    find "$dir/autoresearch" -name __pycache__ -prune -exec rm -rf {} +
    cp "$TRAIN_PY" "$dir/train.py"
    if [[ -n "$edit" ]]; then sed -i "$edit" "$dir/train.py"; fi
    sed -i "s/^TIME_BUDGET = 300 /TIME_BUDGET = $budget /" "$dir/constants.py"
    grep -q "^TIME_BUDGET = $budget " "$dir/constants.py" || { log "could not set TIME_BUDGET in $dir"; return 1; }
    (cd "$dir" && "$PYTHON" prepare.py) >"$BENCH_OUT/$1-prepare.log" 2>&1 || {
        tail -n 5 "$BENCH_OUT/$1-prepare.log" >&2
        log "prepare.py in $dir failed: run 'bash bench/gpu.sh setup' first"
        return 1
    }
    printf '%s\n' "$dir"
}

# run_in NAME DIR COMPILE_CACHE [VAR=VALUE ...] COMMAND...: COMMAND in DIR with that compile
# cache (a new folder is a cold one), log in $BENCH_OUT/NAME.log; then the log's figures
run_in() {
    local name=$1 dir=$2 cache=$3 rc=0 start end
    shift 3
    log "$name: $* (in $dir)"
    start=$(date +%s.%N)
    (cd "$dir" && env TORCHINDUCTOR_CACHE_DIR="$cache/inductor" TRITON_CACHE_DIR="$cache/triton" "$@") \
        >"$BENCH_OUT/$name.log" 2>&1 || rc=$?
    end=$(date +%s.%N)
    "$PYTHON" bench/steps.py "$BENCH_OUT/$name.log" || true
    grep -h "^batch:\|^overhead:" "$BENCH_OUT/$name.log" || true
    awk -v s="$start" -v e="$end" 'BEGIN {printf "%.1f\n", e - s}' >"$BENCH_OUT/$name.wall"
    outside "$name"
    if [[ $rc -ne 0 ]]; then
        tr '\r' '\n' <"$BENCH_OUT/$name.log" | tail -n 5 >&2
        log "$name: exit code $rc"
    fi
    return "$rc"
}

# outside NAME: the seconds run NAME spent outside its budget, as the loop waits them: the
# process's wall time (start-up, compiles, evaluation, exit) less its training_seconds
outside() {
    awk -v w="$(cat "$BENCH_OUT/$1.wall" 2>/dev/null)" '/^training_seconds:/ {t = $2}
         END {if (t != "" && w != "") printf "outside the budget: %.1f s (wall %.1f s)\n", w - t, w
              else if (t == "") print "outside the budget: no figure (no training_seconds: the run did not finish)"
              else print "outside the budget: no figure (no wall time recorded)"}' "$BENCH_OUT/$1.log"
}

fresh_cache() { printf '%s\n' "$WORK/compile-$1-$(date +%s)"; }

failed=0
case "$cmd" in
setup)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$BENCH_OUT/gpu.txt" \
        || log "no nvidia-smi: the runs will say which device they found"
    if [[ -n "$SOURCE" ]]; then
        log "prepare.py --source $SOURCE (cache $AUTORESEARCH_CACHE)"
        "$PYTHON" prepare.py --source "$SOURCE" 2>&1 | tee "$BENCH_OUT/prepare.log"
    else
        log "prepare.py (cache $AUTORESEARCH_CACHE)"
        "$PYTHON" prepare.py 2>&1 | tee "$BENCH_OUT/prepare.log"
    fi
    ;;
train)
    budget=${BUDGET:-300}
    name=${NAME:-$(basename "$TRAIN_PY" .py)-$budget}
    dir=$(run_copy "$name" "$budget")
    run_in "$name" "$dir" "$(fresh_cache "$name")" "$PYTHON" train.py || failed=$?
    ;;
overhead)
    # what program.md's loop pays per experiment beyond the budget, in one compile cache: the
    # first run compiles everything (cold; on a GPU machine it starts the fork server); a
    # hyperparameter edit finds every graph compiled; the MLP's activation (GELU) is a new
    # model graph; one more layer also widens the model (width follows DEPTH): every graph is
    # new, FA4's kernels and the rest stay warm. On a GPU machine the edits are forked, as in a night.
    budget=${BUDGET:-20}
    cache=$(fresh_cache overhead)
    for edit in cold hyperparameter activation depth; do
        rm -f "$BENCH_OUT/overhead-$edit-$budget.log" "$BENCH_OUT/overhead-$edit-$budget.wall"
        case "$edit" in
        cold) sed_edit="" ;;
        hyperparameter) sed_edit='s/^\(MATRIX_LR = \)\([0-9.]*\)/\10.9 * \2/' ;;
        activation) sed_edit='s/^\( *\)return relu_square_mlp(x, self.c_fc.weight, self.c_proj.weight)/\1return self.c_proj(F.gelu(self.c_fc(x)))/' ;;
        depth) sed_edit='s/^DEPTH = \([0-9]*\)/DEPTH = 1 + \1/' ;;
        esac
        if [[ -n "$sed_edit" ]] && sed "$sed_edit" "$TRAIN_PY" | cmp -s - "$TRAIN_PY"; then
            log "overhead-$edit-$budget: the edit '$sed_edit' changes nothing in $TRAIN_PY"
            failed=1
            continue
        fi
        dir=$(run_copy "overhead-$edit-$budget" "$budget" "$sed_edit")
        run_in "overhead-$edit-$budget" "$dir" "$cache" "$PYTHON" train.py || failed=1
    done
    for edit in cold hyperparameter activation depth; do
        if [[ -f "$BENCH_OUT/overhead-$edit-$budget.log" ]]; then
            printf '%-15s %s\n' "$edit" "$(outside "overhead-$edit-$budget")"
        else
            printf '%-15s no run\n' "$edit"
        fi
    done
    ;;
compare)
    budget=${BUDGET:-60}
    [[ $# -gt 0 ]] || set -- default unfused flex
    for variant in "$@"; do
        case "$variant" in
        default | unfused | flex) ;;
        *) log "unknown variant '$variant': use default (FA4 + fused), unfused (FA4 alone) or flex (flex alone)"; exit 1 ;;
        esac
    done
    dir=$(run_copy "compare-$budget" "$budget")
    for variant in "$@"; do
        case "$variant" in
        default) settings=() ;;
        unfused) settings=(AUTORESEARCH_FUSED=0) ;;
        flex) settings=(AUTORESEARCH_ATTENTION=flex AUTORESEARCH_FUSED=0) ;;  # the previous release's setup
        esac
        run_in "compare-$variant-$budget" "$dir" "$(fresh_cache "compare-$variant")" \
            ${settings[@]+"${settings[@]}"} "$PYTHON" train.py || failed=1
    done
    for variant in "$@"; do
        printf '%-10s %s\n' "$variant" "$("$PYTHON" bench/steps.py "$BENCH_OUT/compare-$variant-$budget.log" \
            | grep -E 'tokens/s|^val_bpb|^peak_vram_mb' | tr '\n' ' ')"
    done
    ;;
capped)
    # one compile cache for all caps: a micro-batch an earlier cap compiled is warm for a later one
    budget=${BUDGET:-20}
    [[ $# -gt 0 ]] || set -- 40 24 16 12
    dir=$(run_copy "capped-$budget" "$budget")
    cache=$(fresh_cache capped)
    for gib in "$@"; do
        run_in "capped-${gib}GiB-$budget" "$dir" "$cache" "$PYTHON" "$REPO/bench/cap.py" "$gib" || failed=1
    done
    ;;
fused)
    TRITON_CACHE_DIR=$(fresh_cache fused)/triton "$PYTHON" bench/fused.py "$BENCH_OUT/fused.json" 2>&1 | tee "$BENCH_OUT/fused.log"
    ;;
loader)
    "$PYTHON" bench/loader.py --device cuda --B 128 --T 2048 --seconds 20 2>&1 | tee "$BENCH_OUT/loader.log"
    ;;
profile)
    cache=$(fresh_cache profile)
    TORCHINDUCTOR_CACHE_DIR="$cache/inductor" TRITON_CACHE_DIR="$cache/triton" \
        "$PYTHON" bench/step_profile.py "$@" 2>&1 | tee -a "$BENCH_OUT/profile.log"
    ;;
attention)
    [[ $# -gt 0 ]] || set -- '{}'
    n=0
    for variant in "$@"; do
        n=$((n + 1))
        cache=$(fresh_cache "attention-$n")
        if [[ "$variant" == fa4 ]]; then args=(--backend fa4); else args=(--options "$variant"); fi
        TORCHINDUCTOR_CACHE_DIR="$cache/inductor" TRITON_CACHE_DIR="$cache/triton" \
            FLASH_ATTENTION_CUTE_DSL_CACHE_DIR="$cache/fa4" \
            "$PYTHON" bench/attention.py "${args[@]}" 2>&1 | tee -a "$BENCH_OUT/attention.log"
    done
    ;;
esac
exit "$failed"
