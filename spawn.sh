#!/usr/bin/env bash
# spawn.sh: several research agents, each on its own branch, in its own git
# worktree and tmux pane, all in one tmux session; each experiment runs on one
# local GPU, or (--slurm) as a Slurm job.
#
# Usage:
#   bash spawn.sh launch <tag> <agent:gpu> [<agent:gpu> ...]
#   bash spawn.sh launch <tag> --slurm <agent:N> [<agent:N> ...]
#   bash spawn.sh stop <tag>
#   bash spawn.sh status
#   bash spawn.sh help
#
# Examples:
#   bash spawn.sh launch mar5 claude:0 claude:1 codex:2 opus:3
#   CLAUDE_MODEL=opus bash spawn.sh launch mar5b claude:0 claude:1
#   SLURM_RUN_ARGS="--partition=gpu --account=mylab --gres=gpu:1 --time=00:15:00" \
#       bash spawn.sh launch mar6 --slurm claude:0 claude:1 claude:2 claude:3
#   tmux attach -t autoresearch-mar5          # watch them work (detach: Ctrl-b d)
#   bash spawn.sh status
#   bash spawn.sh stop mar5                   # results land in results/mar5-gpu<N>.tsv
#   uv run analysis.py results/mar5-gpu*.tsv --plot progress.png
#
# launch, per <agent:N> worker:
#   - a fresh branch autoresearch/<tag>-gpu<N> from the commit you launch from
#     (refused, changing nothing, if any such branch already exists);
#   - a git worktree worktrees/gpu<N> with the repo's .venv linked in;
#   - the agent started there with the prompt in AGENT_PROMPT, this shell's
#     PATH, SLURM_CONF and AUTORESEARCH_*, ANTHROPIC_*, OPENAI_*, CLAUDE_*,
#     CODEX_*, HF_*, UV_* variables (a pane otherwise gets the environment of
#     the tmux server, which may have started before you exported them), and
#     AUTORESEARCH_RUN, the prefix of program.md's run command
#     ($AUTORESEARCH_RUN uv run train.py > run.log 2>&1):
#       local:   <N> is a GPU index as nvidia-smi shows it (refused if the
#                machine has no such GPU); CUDA_VISIBLE_DEVICES=<N> and an
#                empty AUTORESEARCH_RUN: the run starts right there;
#       --slurm: <N> only numbers the workers; no local GPU is bound and
#                AUTORESEARCH_RUN is
#                  srun --job-name=autoresearch-<tag>-<N> $SLURM_RUN_ARGS
#                so each run is a job of one GPU on the cluster. The agents
#                stay here (a login node has the network their API needs).
#   - one pane of the tiled tmux session autoresearch-<tag>; when the agent
#     exits the pane says so and leaves a shell open.
#   Then a background watcher checks every WATCH_INTERVAL seconds and types
#   NUDGE_MESSAGE + Enter into a pane whose screen has not changed since the
#   last check and shows an idle prompt (one of the last IDLE_LINES non-empty
#   lines matches IDLE_PROMPT_REGEX). launch returns once the workers are up.
#   Everything is validated before anything is created (the tag, the workers,
#   the agent programs, the GPU indices, srun for --slurm); if a step fails,
#   what was made is removed again.
# stop: ends the watcher, cancels the tag's Slurm jobs (when squeue is
#   installed), ends the tmux session, moves each worktree's results.tsv to
#   results/<tag>-gpu<N>.tsv (never overwriting: -2, -3, ... suffixes),
#   removes the worktrees (also one whose agent switched branch or lost its
#   .git), keeps the branches. Safe to re-run.
# status: tmux sessions, worktrees, research branches, results files, and the
#   autoresearch Slurm jobs (when squeue is installed).
#
# Agents: claude (model $CLAUDE_MODEL), sonnet, opus, haiku: the claude CLI with
#   --model and $CLAUDE_FLAGS; codex: the codex CLI with $CODEX_FLAGS. The night
#   is unattended, so by default both skip every permission prompt: the agents
#   run commands without asking. Run them on a machine you are fine with that.
# Tags: letters, digits, '-' and '_' (a branch-name part and a tmux session name).
#
# Overrides (environment):
#   CLAUDE_MODEL=sonnet                               model for the 'claude' agent
#   CLAUDE_FLAGS=--dangerously-skip-permissions       extra claude CLI flags
#   CODEX_FLAGS=--dangerously-bypass-approvals-and-sandbox   extra codex CLI flags
#   AUTORESEARCH_AGENT_CMD=                           if set: the command line started in
#                                                     each worktree instead of an agent CLI
#                                                     (the prompt is appended as its last
#                                                     argument); any agent name is accepted
#   AGENT_PROMPT="Read program.md and follow the instructions."
#   SLURM_RUN_ARGS="--gres=gpu:1 --time=00:15:00"     --slurm: srun's arguments besides the
#                                                     job name, replaced as a whole (split
#                                                     on whitespace: add partition, account)
#   WATCH_INTERVAL=120                                seconds between idle checks
#   NUDGE_MESSAGE="keep going"                        typed into an idle pane
#   IDLE_PROMPT_REGEX='^[[:space:]]*(│[[:space:]]*)?(>|›|❯)([[:space:]].*)?$'
#   IDLE_LINES=6                                      last non-empty lines searched for it
#   TMUX_SOCKET=                                      if set: use a private tmux server
#                                                     (tmux -L <socket>), as the tests do
#                                                     (then: tmux -L <socket> attach -t ...)

set -euo pipefail

CLAUDE_MODEL=${CLAUDE_MODEL:-sonnet}
CLAUDE_FLAGS=${CLAUDE_FLAGS:---dangerously-skip-permissions}
CODEX_FLAGS=${CODEX_FLAGS:---dangerously-bypass-approvals-and-sandbox}
AUTORESEARCH_AGENT_CMD=${AUTORESEARCH_AGENT_CMD:-}
AGENT_PROMPT=${AGENT_PROMPT:-Read program.md and follow the instructions.}
# 300 s of training + about a minute of start-up and compilation + the
# evaluation, with room to spare: a run that hangs is cut by Slurm.
SLURM_RUN_ARGS=${SLURM_RUN_ARGS:---gres=gpu:1 --time=00:15:00}
WATCH_INTERVAL=${WATCH_INTERVAL:-120}
NUDGE_MESSAGE=${NUDGE_MESSAGE:-keep going}
IDLE_PROMPT_REGEX=${IDLE_PROMPT_REGEX:-'^[[:space:]]*(│[[:space:]]*)?(>|›|❯)([[:space:]].*)?$'}
IDLE_LINES=${IDLE_LINES:-6}
TMUX_SOCKET=${TMUX_SOCKET:-}

# =============================================================================
# Helpers
# =============================================================================

log() { printf '[spawn %(%H:%M:%S)T] %s\n' -1 "$*"; }
warn() { log "warning: $*" >&2; }
die() { log "error: $*" >&2; exit 1; }

usage() {
    # The header comment above, without its leading '# '.
    local line
    while IFS= read -r line; do
        [[ "$line" == "#!"* ]] && continue
        [[ "$line" == "#"* ]] || break
        line=${line#"#"}
        printf '%s\n' "${line# }"
    done < "${BASH_SOURCE[0]}"
}

tmux_() {
    if [[ -n "$TMUX_SOCKET" ]]; then
        command tmux -L "$TMUX_SOCKET" "$@"
    else
        command tmux "$@"
    fi
}

session_exists() { tmux_ has-session -t "=$1" 2>/dev/null; }

check_tools() {
    command -v git >/dev/null 2>&1 || die "git not found: install git"
    command -v tmux >/dev/null 2>&1 || die "tmux not found: install tmux (e.g. apt-get install tmux)"
}

# The main worktree's root, also when called from inside worktrees/gpu<N>.
find_root() {
    local common
    common=$(git rev-parse --git-common-dir 2>/dev/null) \
        || die "not inside a git repository: run spawn.sh from the autoresearch repo"
    (cd "$common/.." && pwd -P)  # physical, as git lists worktrees
}

check_tag() {
    local tag=$1
    [[ "$tag" =~ ^[A-Za-z0-9][A-Za-z0-9_-]*$ ]] \
        || die "invalid tag '$tag': use letters, digits, '-' and '_' (it names branches and a tmux session)"
    git check-ref-format --branch "autoresearch/$tag-gpu0" >/dev/null 2>&1 \
        || die "invalid tag '$tag': not valid in a branch name"
}

# The command line that starts <agent>, the prompt not included.
agent_cmdline() {
    local agent=$1 flags=()
    if [[ -n "$AUTORESEARCH_AGENT_CMD" ]]; then
        printf '%s' "$AUTORESEARCH_AGENT_CMD"
        return 0
    fi
    case "$agent" in
        claude | sonnet | opus | haiku)
            local model=$agent
            [[ "$agent" == claude ]] && model=$CLAUDE_MODEL
            read -r -a flags <<< "$CLAUDE_FLAGS"
            printf '%q ' claude "${flags[@]}" --model "$model"
            ;;
        codex)
            read -r -a flags <<< "$CODEX_FLAGS"
            printf '%q ' codex "${flags[@]}"
            ;;
        *) return 1 ;;
    esac
}

# The program a worker's command line starts: its first word that is not a
# NAME=value assignment.
agent_program() {
    local words=() word
    read -r -a words <<< "$(agent_cmdline "$1")"
    for word in "${words[@]}"; do
        [[ "$word" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || { printf '%s' "$word"; return 0; }
    done
    return 1
}

# 'export NAME=value; ...' for the variables a pane must see from this shell.
FORWARD_ENV_REGEX='^(PATH|SLURM_CONF|(AUTORESEARCH|ANTHROPIC|OPENAI|CLAUDE|CODEX|HF|UV)_[A-Za-z0-9_]*)$'
env_exports() {
    local name
    while IFS= read -r name; do
        if [[ "$name" =~ $FORWARD_ENV_REGEX ]]; then
            printf 'export %s=%q; ' "$name" "${!name}"
        fi
    done < <(compgen -e)
}

pidfile_for() { printf '%s/worktrees/.watcher-%s.pid' "$ROOT" "$1"; }

# What launch made for a tag: 'worktree <path>' lines, and 'slurm' if its runs
# go to Slurm. stop finds the worktrees there even after an agent switched
# branch or deleted its worktree's .git.
manifest_for() { printf '%s/worktrees/.workers-%s' "$ROOT" "$1"; }

# The Slurm job name of worker <N> of <tag>: stop and status find jobs by it.
job_name() { printf 'autoresearch-%s-%s' "$1" "$2"; }

# 'id|name|state|time' for each of this user's jobs named autoresearch-*
# (of one tag if given); fails, saying why on stderr, when squeue does.
slurm_jobs() {
    local tag=${1:-} out line name
    out=$(squeue -h -u "$(id -un)" -o '%i|%j|%T|%M' 2>&1) || { printf '%s\n' "$out" >&2; return 1; }
    while IFS= read -r line; do
        name=$(cut -d '|' -f 2 <<< "$line")
        if [[ -n "$tag" ]]; then
            [[ "$name" =~ ^autoresearch-$tag-[0-9]+$ ]] || continue
        else
            [[ "$name" == autoresearch-* ]] || continue
        fi
        printf '%s\n' "$line"
    done <<< "$out"
}

# The pid in the watcher's pid file if that process is still our watcher.
watcher_pid() {
    local pidfile pid args=""
    pidfile=$(pidfile_for "$1")
    [[ -f "$pidfile" ]] || return 1
    pid=$(<"$pidfile")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    if [[ -r "/proc/$pid/cmdline" ]]; then
        args=$(tr '\0' ' ' < "/proc/$pid/cmdline")
    else
        args=$(ps -o args= -p "$pid" 2>/dev/null) || true
    fi
    args=${args%" "}
    [[ "$args" == *spawn.sh*" _watch $1" ]] || return 1
    printf '%s' "$pid"
}

# The branches autoresearch/<tag>-gpu<N> of one tag, one a line.
tag_branches() {
    local branch
    while IFS= read -r branch; do
        [[ "$branch" =~ ^autoresearch/$1-gpu[0-9]+$ ]] && printf '%s\n' "$branch"
    done < <(git -C "$ROOT" for-each-ref --format='%(refname:short)' "refs/heads/autoresearch/$1-gpu*")
    return 0
}

# The path of the worktree that has <branch> checked out.
worktree_of_branch() {
    local branch=$1 line path=""
    while IFS= read -r line; do
        case "$line" in
            "worktree "*) path=${line#worktree } ;;
            "branch refs/heads/$branch") printf '%s' "$path"; return 0 ;;
        esac
    done < <(git -C "$ROOT" worktree list --porcelain)
    return 1
}

# =============================================================================
# launch
# =============================================================================

# What launch has made so far, undone if it does not finish.
MADE_BRANCHES=()
MADE_WORKTREES=()
MADE_SESSION=""
MADE_MANIFEST=""

rollback() {
    local rc=$? wt br
    [[ "$rc" -eq 0 ]] && return 0
    log "launch failed: removing what it made"
    [[ -n "$MADE_SESSION" ]] && tmux_ kill-session -t "=$MADE_SESSION" 2>/dev/null || true
    for wt in "${MADE_WORKTREES[@]}"; do
        git -C "$ROOT" worktree remove --force "$wt" 2>/dev/null || true
    done
    git -C "$ROOT" worktree prune 2>/dev/null || true
    for br in "${MADE_BRANCHES[@]}"; do
        git -C "$ROOT" branch -D "$br" >/dev/null 2>&1 || true
    done
    [[ -n "$MADE_MANIFEST" ]] && rm -f "$MADE_MANIFEST"
    exit "$rc"
}

# The number of GPUs nvidia-smi lists; fails (with a warning) when it cannot tell.
gpu_count() {
    local out
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        warn "nvidia-smi not found: GPU indices cannot be checked against this machine's GPUs"
        return 1
    fi
    if ! out=$(nvidia-smi -L 2>&1); then
        warn "nvidia-smi -L failed ($(head -n 1 <<< "$out")): GPU indices are not checked"
        return 1
    fi
    grep -c '^GPU [0-9]' <<< "$out" || true
}

cmd_launch() {
    # --slurm may stand anywhere; the first other word is the tag.
    local slurm=0 words=() arg
    for arg in "$@"; do
        case "$arg" in
            --slurm) slurm=1 ;;
            --*) die "unknown option '$arg': the only option is --slurm" ;;
            *) words+=("$arg") ;;
        esac
    done
    [[ ${#words[@]} -ge 1 ]] || die "launch needs a tag and workers: bash spawn.sh launch <tag> [--slurm] <agent:N> [...]"
    local tag=${words[0]}
    check_tag "$tag"
    local specs=("${words[@]:1}")
    [[ ${#specs[@]} -ge 1 ]] || die "no workers given: bash spawn.sh launch $tag [--slurm] <agent:N> [...] (e.g. claude:0)"

    local session="autoresearch-$tag" head spec agent gpu digits program
    local agents=() gpus=() seen=" "
    head=$(git rev-parse --verify HEAD 2>/dev/null) || die "this repository has no commit to branch from"

    # Validate everything before creating anything.
    for spec in "${specs[@]}"; do
        [[ "$spec" =~ ^([A-Za-z0-9_.-]+):([0-9]+)$ ]] \
            || die "bad worker '$spec': expected <agent>:<index>, e.g. claude:0"
        agent=${BASH_REMATCH[1]}
        # Compare digits, not numbers: bash arithmetic wraps past 2^63.
        digits=${BASH_REMATCH[2]#"${BASH_REMATCH[2]%%[!0]*}"}
        [[ ${#digits} -le 4 ]] || die "bad worker '$spec': index ${BASH_REMATCH[2]} is out of range"
        gpu=$((10#${digits:-0}))
        [[ "$seen" != *" $gpu "* ]] || die "GPU $gpu is given twice: one agent per GPU"
        seen+="$gpu "
        agent_cmdline "$agent" >/dev/null \
            || die "unknown agent '$agent': use claude, sonnet, opus, haiku or codex (or set AUTORESEARCH_AGENT_CMD)"
        agents+=("$agent")
        gpus+=("$gpu")
    done
    # Else the pane alone would say 'command not found', and launch exit 0.
    for agent in "${agents[@]}"; do
        program=$(agent_program "$agent") || die "AUTORESEARCH_AGENT_CMD names no program"
        command -v "$program" >/dev/null 2>&1 \
            || die "agent program '$program' not found on PATH (agent $agent): install it, or set AUTORESEARCH_AGENT_CMD"
    done
    if [[ "$slurm" -eq 1 ]]; then
        command -v srun >/dev/null 2>&1 \
            || die "srun not found: --slurm sends each run to Slurm with srun; launch from a Slurm login node"
        [[ "$SLURM_RUN_ARGS" != *[\'\"\\]* ]] \
            || die "SLURM_RUN_ARGS must not contain quotes or backslashes: it is split on whitespace, nothing else"
    else
        local ngpu valid
        if ngpu=$(gpu_count); then
            valid="indices 0..$((ngpu - 1))"
            [[ "$ngpu" -gt 0 ]] || valid="none"
            for gpu in "${gpus[@]}"; do
                [[ "$gpu" -lt "$ngpu" ]] \
                    || die "no GPU $gpu: nvidia-smi lists $ngpu GPU(s) ($valid); for Slurm workers use --slurm"
            done
        fi
    fi
    git -C "$ROOT" worktree prune
    session_exists "$session" && die "tmux session $session already exists: bash spawn.sh stop $tag"
    for gpu in "${gpus[@]}"; do
        git -C "$ROOT" show-ref --verify --quiet "refs/heads/autoresearch/$tag-gpu$gpu" \
            && die "branch autoresearch/$tag-gpu$gpu exists (branches of past runs are kept): pick a new tag"
        [[ ! -e "$ROOT/worktrees/gpu$gpu" ]] \
            || die "worktrees/gpu$gpu exists (another run on GPU $gpu?): stop that run first"
    done
    if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
        warn "uncommitted changes are not part of the workers' starting point ($(git rev-parse --short HEAD))"
    fi
    git cat-file -e "$head:program.md" 2>/dev/null || warn "program.md is not in commit $head: the agents' prompt points at it"
    [[ -d "$ROOT/.venv" ]] || warn "no .venv in $ROOT (run 'uv sync' there): workers' 'uv run' will build their own"

    trap rollback EXIT
    local where="local GPUs"
    [[ "$slurm" -eq 1 ]] && where="Slurm (srun $SLURM_RUN_ARGS)"
    log "launching $session from $(git rev-parse --short HEAD) with ${#gpus[@]} worker(s), runs on $where"
    mkdir -p "$ROOT/worktrees"
    MADE_MANIFEST=$(manifest_for "$tag")
    : > "$MADE_MANIFEST"
    [[ "$slurm" -eq 1 ]] && printf 'slurm\n' >> "$MADE_MANIFEST"
    local i wt branch cmd pane run label
    for i in "${!gpus[@]}"; do
        gpu=${gpus[$i]}
        agent=${agents[$i]}
        wt="$ROOT/worktrees/gpu$gpu"
        branch="autoresearch/$tag-gpu$gpu"
        MADE_BRANCHES+=("$branch")  # before: a failed add may leave either behind
        MADE_WORKTREES+=("$wt")
        printf 'worktree %s\n' "$wt" >> "$MADE_MANIFEST"
        git -C "$ROOT" worktree add --quiet -b "$branch" "$wt" "$head"
        if [[ -d "$ROOT/.venv" ]]; then
            ln -sfn "$ROOT/.venv" "$wt/.venv"
            # '.venv/' in .gitignore matches a directory, not this link.
            git -C "$wt" check-ignore -q .venv \
                || warn "the .venv link in worktrees/gpu$gpu is not git-ignored: add '.venv' (no slash) to .gitignore"
        fi

        # What program.md's run command puts in front of 'uv run train.py'.
        if [[ "$slurm" -eq 1 ]]; then
            run="srun --job-name=$(job_name "$tag" "$gpu") $SLURM_RUN_ARGS"
            cmd="unset CUDA_VISIBLE_DEVICES; export AUTORESEARCH_RUN=$(printf '%q' "$run"); "
            label="worker $gpu (Slurm job $(job_name "$tag" "$gpu"))"
        else
            cmd="export CUDA_VISIBLE_DEVICES=$gpu AUTORESEARCH_RUN=; "
            label="GPU $gpu"
        fi
        # The pane runs bash directly (no default-shell): the agent, then a
        # note that it ended, then a shell left open in the worktree.
        cmd="$(env_exports)$cmd$(agent_cmdline "$agent") $(printf '%q' "$AGENT_PROMPT")"
        cmd+="; rc=\$?; tmux set-option -p @autoresearch_done 1 2>/dev/null"
        cmd+="; printf '\\n[agent exited with status %s: session ended on %s]\\n' \"\$rc\" $(printf '%q' "$label"); exec bash"
        if [[ -z "$MADE_SESSION" ]]; then
            tmux_ new-session -d -s "$session" -x 220 -y 60 -c "$wt" bash -c "$cmd"
            MADE_SESSION=$session
            tmux_ set-option -t "=$session:" pane-border-status top
            tmux_ set-option -t "=$session:" pane-border-format ' #{@worker} '
            pane=$(tmux_ display-message -p -t "=$session:" '#{pane_id}')
        else
            pane=$(tmux_ split-window -t "=$session:" -c "$wt" -P -F '#{pane_id}' bash -c "$cmd")
            tmux_ select-layout -t "=$session:" tiled >/dev/null
        fi
        tmux_ set-option -p -t "$pane" @worker "gpu$gpu $agent $branch"
        log "gpu$gpu: $agent on $branch in worktrees/gpu$gpu, runs on $label"
    done

    # The watcher outlives this script; its output goes to a log, not to our
    # stdout, so that callers waiting on launch's output are not held up.
    local pidfile wlog
    pidfile=$(pidfile_for "$tag")
    wlog="$ROOT/worktrees/.watcher-$tag.log"
    nohup bash "$SCRIPT" _watch "$tag" < /dev/null >> "$wlog" 2>&1 &
    printf '%s\n' "$!" > "$pidfile"
    trap - EXIT
    log "watcher pid $(<"$pidfile"): nudges idle panes every ${WATCH_INTERVAL}s (log: worktrees/.watcher-$tag.log)"
    if [[ -n "$TMUX_SOCKET" ]]; then
        log "attach: tmux -L $TMUX_SOCKET attach -t $session    stop: bash spawn.sh stop $tag"
    else
        log "attach: tmux attach -t $session    stop: bash spawn.sh stop $tag"
    fi
}

# =============================================================================
# The idle-nudge watcher (runs in the background, started by launch)
# =============================================================================

# True when one of the last IDLE_LINES non-empty lines of the screen looks like
# an agent's input prompt (the box at the bottom of Claude Code or Codex).
looks_idle() {
    local screen=$1 lines=() line n=0 i
    mapfile -t lines <<< "$screen"
    for ((i = ${#lines[@]} - 1; i >= 0 && n < IDLE_LINES; i--)); do
        line=${lines[$i]}
        [[ "$line" =~ ^[[:space:]]*$ ]] && continue
        n=$((n + 1))
        [[ "$line" =~ $IDLE_PROMPT_REGEX ]] && return 0
    done
    return 1
}

cmd_watch() {
    local tag=$1 session="autoresearch-$1" pidfile
    pidfile=$(pidfile_for "$tag")
    local sleeper=""
    # stop sends TERM: take the sleep down too, so nothing is left behind.
    trap '[[ -n "$sleeper" ]] && kill "$sleeper" 2>/dev/null; exit 0' TERM INT HUP
    trap '[[ "$(cat "$pidfile" 2>/dev/null)" == "$$" ]] && rm -f "$pidfile"' EXIT
    declare -A last=()
    local pane dead done_ worker screen
    log "watching $session every ${WATCH_INTERVAL}s"
    while true; do
        sleep "$WATCH_INTERVAL" &
        sleeper=$!
        wait "$sleeper" || true
        sleeper=""
        session_exists "$session" || break
        while IFS=$'\t' read -r pane dead done_ worker; do
            [[ "$dead" == 1 || "$done_" == 1 ]] && continue
            screen=$(tmux_ capture-pane -p -t "$pane" 2>/dev/null) || continue
            if [[ "${last[$pane]+set}" && "${last[$pane]}" == "$screen" ]] && looks_idle "$screen"; then
                log "nudging $pane ($worker)"
                tmux_ send-keys -t "$pane" -l "$NUDGE_MESSAGE"
                sleep 0.3  # let a TUI take the text before the Enter
                tmux_ send-keys -t "$pane" Enter
                screen=$(tmux_ capture-pane -p -t "$pane" 2>/dev/null) || true
            fi
            last[$pane]=$screen
        done < <(tmux_ list-panes -s -t "=$session" \
                    -F $'#{pane_id}\t#{pane_dead}\t#{?@autoresearch_done,1,0}\t#{@worker}' 2>/dev/null)
    done
    log "session $session is gone: watcher exits"
}

# =============================================================================
# stop
# =============================================================================

# results/<name>.tsv, or the first free results/<name>-<k>.tsv.
free_results_path() {
    local name=$1 path k=2
    path="$ROOT/results/$name.tsv"
    while [[ -e "$path" ]]; do
        path="$ROOT/results/$name-$k.tsv"
        k=$((k + 1))
    done
    printf '%s' "$path"
}

# Cancel the tag's Slurm jobs; true if there were any. <slurm> is 1 when
# launch recorded a --slurm run: only then is a missing or failing squeue
# worth a word.
cancel_jobs() {
    local tag=$1 slurm=$2 jobs ids=()
    local manual="cancel its jobs yourself: scancel --name=$(job_name "$tag" '<N>')"
    if ! command -v squeue >/dev/null 2>&1; then
        [[ "$slurm" -eq 0 ]] || warn "squeue not found: $manual"
        return 1
    fi
    if ! jobs=$(slurm_jobs "$tag" 2>/dev/null); then
        [[ "$slurm" -eq 0 ]] || warn "squeue failed: $manual"
        return 1
    fi
    [[ -n "$jobs" ]] || return 1
    mapfile -t ids < <(cut -d '|' -f 1 <<< "$jobs")
    scancel "${ids[@]}" || warn "scancel ${ids[*]} failed"
    log "Slurm job(s) ${ids[*]} cancelled"
}

# Move <worktree>'s results.tsv to results/<tag>-gpu<N>.tsv, then remove it.
retire_worktree() {
    local tag=$1 wt=$2 dest
    if [[ -f "$wt/results.tsv" ]]; then
        mkdir -p "$ROOT/results"
        dest=$(free_results_path "$tag-${wt##*/}")
        mv "$wt/results.tsv" "$dest"
        log "results: ${dest#"$ROOT"/} ($(($(wc -l < "$dest") - 1)) rows)"
    fi
    if [[ -e "$wt/.git" && -n "$(git -C "$wt" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
        warn "uncommitted changes in $wt are discarded (committed work stays on its branch)"
    fi
    # git refuses a worktree whose .git is gone; then the folder goes by hand,
    # and only below worktrees/ (the prune below forgets git's record of it).
    if ! git -C "$ROOT" worktree remove --force "$wt" 2>/dev/null; then
        [[ "$wt" == "$ROOT/worktrees/"* ]] || { warn "$wt is not below worktrees/: left in place"; return 0; }
        rm -rf -- "$wt"
    fi
    log "worktree ${wt#"$ROOT"/} removed"
}

cmd_stop() {
    [[ $# -eq 1 ]] || die "stop needs exactly one tag: bash spawn.sh stop <tag>"
    local tag=$1 session="autoresearch-$1" pid branch wt manifest line slurm=0 did=0
    check_tag "$tag"
    # The tag's worktrees: those launch recorded, and any that has one of the
    # tag's branches checked out (from a launch that kept no record).
    local worktrees=() seen=" "
    manifest=$(manifest_for "$tag")
    if [[ -f "$manifest" ]]; then
        while IFS= read -r line; do
            case "$line" in
                "worktree "*) worktrees+=("${line#worktree }") ;;
                slurm) slurm=1 ;;
            esac
        done < "$manifest"
    fi
    while IFS= read -r branch; do
        wt=$(worktree_of_branch "$branch") && worktrees+=("$wt")
    done < <(tag_branches "$tag")

    if pid=$(watcher_pid "$tag"); then
        kill "$pid" 2>/dev/null || true
        log "watcher $pid stopped"
        did=1
    fi
    rm -f "$(pidfile_for "$tag")"
    cancel_jobs "$tag" "$slurm" && did=1
    if session_exists "$session"; then
        tmux_ kill-session -t "=$session"
        log "tmux session $session ended"
        did=1
    fi

    for wt in "${worktrees[@]}"; do
        [[ -n "$wt" && "$seen" != *" $wt "* && -d "$wt" ]] || continue
        seen+="$wt "
        # A recorded folder removed by hand and reused by another tag's launch.
        branch=$(git -C "$wt" symbolic-ref --quiet --short HEAD 2>/dev/null) || branch=""
        if [[ -e "$wt/.git" && "$branch" == autoresearch/* && ! "$branch" =~ ^autoresearch/$tag-gpu[0-9]+$ ]]; then
            warn "${wt#"$ROOT"/} now belongs to $branch: left in place"
            continue
        fi
        retire_worktree "$tag" "$wt"
        did=1
    done
    rm -f "$manifest"
    git -C "$ROOT" worktree prune
    if [[ "$did" -eq 1 ]]; then
        log "branches kept: $(tag_branches "$tag" | tr '\n' ' ')"
    else
        log "nothing running for tag $tag"
    fi
}

# =============================================================================
# status
# =============================================================================

# Print stdin's lines indented, or "none".
listing() {
    local line any=0
    while IFS= read -r line; do
        printf '  %s\n' "$line"
        any=1
    done
    [[ "$any" -eq 1 ]] || printf '  none\n'
}

cmd_status() {
    local line n f pid tag watcher jobs
    log "tmux sessions:"
    while IFS= read -r line; do
        [[ "$line" == autoresearch-* ]] || continue
        tag=${line%% *}
        tag=${tag#autoresearch-}
        watcher="no watcher"
        pid=$(watcher_pid "$tag") && watcher="watcher pid $pid"
        printf '%s (%s)\n' "$line" "$watcher"
    done < <(tmux_ list-sessions -F '#{session_name} #{session_windows} window(s), created #{t:session_created}' 2>/dev/null || true) \
        | listing

    log "worktrees:"
    while IFS= read -r line; do
        [[ "$line" == "$ROOT/worktrees/"* ]] || continue
        printf '%s\n' "${line#"$ROOT"/}"
    done < <(git -C "$ROOT" worktree list) | listing

    log "research branches:"
    git -C "$ROOT" for-each-ref --format='%(refname:short) %(objectname:short) %(subject)' 'refs/heads/autoresearch/' \
        | listing

    log "results files:"
    for f in "$ROOT"/worktrees/gpu*/results.tsv "$ROOT"/results/*.tsv; do
        [[ -f "$f" ]] || continue
        n=$(($(wc -l < "$f") - 1))
        printf '%s (%s rows)\n' "${f#"$ROOT"/}" "$n"
    done | listing

    if command -v squeue >/dev/null 2>&1; then
        log "Slurm jobs (id|name|state|time):"
        if jobs=$(slurm_jobs 2>&1); then
            [[ -z "$jobs" ]] || printf '%s\n' "$jobs"
        else
            printf 'unavailable (squeue: %s)\n' "$(head -n 1 <<< "$jobs")"
        fi | listing
    fi
}

# =============================================================================
# Main
# =============================================================================

# This script's absolute path, for the watcher (builtins only: this runs
# before the tool checks).
src=${BASH_SOURCE[0]}
[[ "$src" == */* ]] || src="./$src"
SCRIPT="$(cd "${src%/*}" && pwd)/${src##*/}"

[[ $# -ge 1 ]] || die "no command given: bash spawn.sh launch|stop|status|help"
case "$1" in
    help | -h | --help) usage; exit 0 ;;
    launch | stop | status | _watch) ;;
    *) die "unknown command '$1': use launch, stop, status or help" ;;
esac
check_tools
ROOT=$(find_root)
sub=$1; shift
case "$sub" in
    launch) cmd_launch "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status ;;
    _watch) cmd_watch "$@" ;;
esac
