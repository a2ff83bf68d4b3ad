#!/usr/bin/env bash
# spawn.sh: several research agents, each on its own branch, in its own git
# worktree and tmux pane, sharing one board; each experiment runs on one local
# GPU, or (--slurm) as a Slurm job. `bash spawn.sh help` says everything.
#
# This file is glue: it sets the environment (the overrides below) and starts
# autoresearch/launch.py, where the state, the checks, the manifest and the
# watcher live (stdlib Python, tested by tests/test_spawn.py).

set -euo pipefail

usage() {
    cat <<'EOF'
Usage:
  bash spawn.sh launch <tag> <agent:gpu> [<agent:gpu> ...]
  bash spawn.sh launch <tag> --slurm <agent:N> [<agent:N> ...]
  bash spawn.sh stop <tag>
  bash spawn.sh status
  bash spawn.sh board [show [<tag>]]          # inside a worker: where the night stands
  bash spawn.sh board post <status> ...       # inside a worker: post a row
  bash spawn.sh confirm <tag> [K] [--slurm]   # the morning: baseline and best at K seeds (default 3)
  bash spawn.sh help

Examples:
  bash spawn.sh launch mar5 claude:0 claude:1 codex:2 opus:3
  CLAUDE_MODEL=opus bash spawn.sh launch mar5b claude:0 claude:1
  SLURM_RUN_ARGS="--partition=gpu --account=mylab --gres=gpu:1 --time=00:15:00" \
      bash spawn.sh launch mar6 --slurm claude:0 claude:1 claude:2 claude:3
  tmux attach -t autoresearch-mar5          # watch them work (detach: Ctrl-b d)
  bash spawn.sh board show mar5             # the night's board, from outside
  bash spawn.sh status
  bash spawn.sh stop mar5                   # results land in results/mar5-gpu<N>.tsv
  uv run analysis.py results/mar5-board.tsv --plot frontier.png   # the night's frontier
  uv run analysis.py results/mar5-gpu*.tsv --plot progress.png    # each worker's own log
  bash spawn.sh confirm mar5                # the number to quote: the night's gain at 3 new seeds
  uv run analysis.py results/mar5-confirm.tsv

launch, per <agent:N> worker:
  - a fresh branch autoresearch/<tag>-gpu<N> from the commit you launch from
    (refused, changing nothing, if any such branch already exists);
  - a git worktree worktrees/gpu<N> with the repo's .venv linked in. The
    worktrees are worktrees of this one repository: they share its object
    store, so every worker's commits are reachable from every other's;
  - the agent started there with the prompt in AGENT_PROMPT, this shell's
    PATH, SLURM_CONF and AUTORESEARCH_*, ANTHROPIC_*, OPENAI_*, CLAUDE_*,
    CODEX_*, HF_*, UV_* variables, AUTORESEARCH_TAG, AUTORESEARCH_WORKER
    (gpu<N>), AUTORESEARCH_BOARD (the board's file), and AUTORESEARCH_RUN,
    the prefix of program.md's run command
      $AUTORESEARCH_RUN timeout 600 uv run train.py > run.log 2>&1
    local:   <N> is a GPU index as nvidia-smi shows it; launch is refused on
             a machine without GPUs or without GPU <N>. CUDA_VISIBLE_DEVICES=<N>
             and an empty AUTORESEARCH_RUN: the run starts right there;
    --slurm: <N> only numbers the workers; no local GPU is bound and
             AUTORESEARCH_RUN is
               srun --job-name=autoresearch-<tag>-<N> $SLURM_RUN_ARGS
             so each run is a job of one GPU on the cluster. The agents
             stay here (a login node has the network their API needs).
  - one pane of the tiled window 'workers' of the tmux session
    autoresearch-<tag>; when the agent exits the pane says so and leaves a
    shell open.
  One board for the night, results/<tag>-board.tsv: every worker posts its
  results and what it is trying now, and reads the night's best at the top of
  each loop (bash spawn.sh board; program.md says when).
  A watcher in the session's second window, 'watcher' (ending the session
  ends it), checks every WATCH_INTERVAL seconds and types NUDGE_MESSAGE +
  Enter into a pane whose screen has not changed since the last check and
  shows an idle prompt (one of the last IDLE_LINES non-empty lines matches
  IDLE_PROMPT_REGEX). launch returns once the workers are up.
  Everything is checked before anything is made (the tag, the workers, the
  agent programs, the GPUs, srun for --slurm, the overrides below, the
  worktrees and results folders); if a step fails, what was made is removed.
stop: ends the tmux session, then every process the night started and what
  those started (also program.md's `timeout 600 uv run train.py`, which runs
  in a process group of its own, and agents that ignore SIGHUP): TERM, then
  KILL after STOP_GRACE seconds, and says which. For --slurm launches it
  cancels the night's Slurm jobs. Then, per worktree, it keeps everything:
  results.tsv goes to results/<tag>-gpu<N>.tsv, every other file git does not
  track (notes, logs, plots, run.log) to results/<tag>-gpu<N>/, uncommitted
  changes to tracked files to results/<tag>-gpu<N>/uncommitted.diff (never
  overwriting: -2, -3, ... suffixes); caches (__pycache__ and kin) and the
  .venv are dropped. Then it removes the worktrees and keeps the
  branches and the board. Safe to re-run.
status: tmux sessions (with their watcher), worktrees, research branches,
  results files and boards, and the Slurm jobs of --slurm launches.
confirm, after stop: the board's baseline (its first keep) and best commits,
  each run at seeds 1..K, which the loop (seed 42, confirmations 43) never
  used: each run in a temporary worktree worktrees/confirm-<tag>/ at its
  commit, with AUTORESEARCH_SEED=<seed>, output to
  results/<tag>-confirm/<commit>-seed<seed>.log, a row appended to
  results/<tag>-confirm.tsv. Local: one run per free GPU at a time (every
  GPU nvidia-smi lists that no running night holds), CUDA_VISIBLE_DEVICES
  set; --slurm: all at once, each `srun --job-name=autoresearch-<tag>-confirm
  $SLURM_RUN_ARGS`. Runs already in the file are not repeated (a re-run
  resumes; a larger K adds seeds). Refused before anything is made for an
  unknown tag, a missing board, a night still running, K < 1, no free GPU
  without --slurm; the worktrees are removed at the end, also on Ctrl-C.
  Then: uv run analysis.py results/<tag>-confirm.tsv (mean +- sd of the gain).

Agents: claude (model $CLAUDE_MODEL), sonnet, opus, haiku: the claude CLI with
  --model and $CLAUDE_FLAGS; codex: the codex CLI with $CODEX_FLAGS. The night
  is unattended, so by default both skip every permission prompt: the agents
  run commands without asking. Run them on a machine you are fine with that.
Tags: letters, digits, '-' and '_', at most 64 (a branch-name part and a tmux
  session name).

Overrides (environment):
  CLAUDE_MODEL=sonnet                               model for the 'claude' agent
  CLAUDE_FLAGS=--dangerously-skip-permissions       extra claude CLI flags
  CODEX_FLAGS=--dangerously-bypass-approvals-and-sandbox   extra codex CLI flags
  AUTORESEARCH_AGENT_CMD=                           if set: the command line started in
                                                    each worktree instead of an agent CLI
                                                    (the prompt is appended as its last
                                                    argument); any agent name is accepted
  AGENT_PROMPT="Read program.md and follow the instructions."
  SLURM_RUN_ARGS="--gres=gpu:1 --time=00:15:00"     --slurm: srun's arguments besides the
                                                    job name, replaced as a whole (split
                                                    on whitespace: add partition, account)
  SLURM_TIMEOUT=5                                   seconds squeue or scancel may take
  WATCH_INTERVAL=120                                seconds between idle checks (>= 1)
  NUDGE_MESSAGE="keep going"                        typed into an idle pane
  IDLE_PROMPT_REGEX='^\s*(│\s*)?(>|›|❯)(\s.*)?$'     a Python regex ([:space:] and kin read too)
  IDLE_LINES=6                                      last non-empty lines searched for it
  STOP_GRACE=10                                     seconds between stop's TERM and KILL
  CONFIRM_RUN_CMD="timeout 600 uv run train.py"     what confirm runs in each worktree (bash -c)
  AUTORESEARCH_CACHE=                               the data cache: an absolute path
  TMUX_SOCKET=                                      if set: use a private tmux server
                                                    (tmux -L <socket>), as the tests do
                                                    (then: tmux -L <socket> attach -t ...)
  AUTORESEARCH_PYTHON=                              the Python that runs the launcher
                                                    (default: .venv/bin/python, else python3)
EOF
}

export CLAUDE_MODEL=${CLAUDE_MODEL:-sonnet}
export CLAUDE_FLAGS=${CLAUDE_FLAGS:---dangerously-skip-permissions}
export CODEX_FLAGS=${CODEX_FLAGS:---dangerously-bypass-approvals-and-sandbox}
export AUTORESEARCH_AGENT_CMD=${AUTORESEARCH_AGENT_CMD:-}
export AGENT_PROMPT=${AGENT_PROMPT:-Read program.md and follow the instructions.}
# 300 s of training + about a minute of start-up and compilation + the
# evaluation, with room to spare: a run that hangs is cut by Slurm.
export SLURM_RUN_ARGS=${SLURM_RUN_ARGS:---gres=gpu:1 --time=00:15:00}
export SLURM_TIMEOUT=${SLURM_TIMEOUT:-5}
export WATCH_INTERVAL=${WATCH_INTERVAL:-120}
export NUDGE_MESSAGE=${NUDGE_MESSAGE:-keep going}
export IDLE_PROMPT_REGEX=${IDLE_PROMPT_REGEX:-'^\s*(│\s*)?(>|›|❯)(\s.*)?$'}
export IDLE_LINES=${IDLE_LINES:-6}
export STOP_GRACE=${STOP_GRACE:-10}
export CONFIRM_RUN_CMD=${CONFIRM_RUN_CMD:-timeout 600 uv run train.py}
export TMUX_SOCKET=${TMUX_SOCKET:-}

log() { printf '[spawn %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "error: $*" >&2; exit 1; }

case "${1:-}" in
    help | -h | --help) usage; exit 0 ;;
esac

src=${BASH_SOURCE[0]}
[[ "$src" == */* ]] || src="./$src"
here=$(cd "${src%/*}" && pwd -P)  # builtins only: this runs before any tool is checked
[[ -f "$here/autoresearch/launch.py" ]] || die "$here/autoresearch/launch.py is missing: spawn.sh needs the whole repository"
python=${AUTORESEARCH_PYTHON:-}
if [[ -z "$python" ]]; then
    python=python3
    [[ -x "$here/.venv/bin/python" ]] && python="$here/.venv/bin/python"
fi
command -v "$python" >/dev/null 2>&1 || die "$python not found: install Python 3.10+ (or run 'uv sync' here)"
new_enough=$("$python" -c 'import sys; print(sys.version_info >= (3, 10))' 2>/dev/null) \
    || die "$python does not run: set AUTORESEARCH_PYTHON to a Python 3.10+ (or run 'uv sync' here)"
[[ "$new_enough" == True ]] \
    || die "$python is older than 3.10: set AUTORESEARCH_PYTHON to a newer one (or run 'uv sync' here)"
exec "$python" "$here/autoresearch/launch.py" "$@"
