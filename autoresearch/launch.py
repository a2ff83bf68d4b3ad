"""
The launcher behind spawn.sh: research agents, each on its own branch, in its
own git worktree and tmux pane, all in one tmux session, sharing one board.

spawn.sh sets the environment (its overrides, see `bash spawn.sh help`) and
runs this file:

    launch.py launch <tag> [--slurm] <agent:N> [...]   check everything, then make the night
    launch.py stop <tag>                               end it, keep everything it produced
    launch.py status                                   what runs, what is kept
    launch.py board [show|post] ...                    the night's board (autoresearch.board)
    launch.py confirm <tag> [K] [--slurm]              the morning's confirmation (autoresearch.confirm)
    launch.py _watch <manifest>                        the watcher (the session's hidden window)

What it holds, top to bottom: the settings and their checks; the repository,
git and tmux; the workers and their agents; the manifest (worktrees/
.launch-<tag>.json, what launch made, so that stop can undo it); launch;
the watcher; stop; status. Stdlib only; imports autoresearch.board, and
autoresearch.confirm when asked to confirm. Nothing here is run at import.
"""

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file by spawn.sh: the repository root is the package's parent
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
from autoresearch import board  # noqa: E402

MAX_TAG = 64              # a tag names branches, a tmux session, files and Slurm jobs
MAX_INDEX_DIGITS = 4      # worker and GPU indices up to 9999
TMUX_TIMEOUT = 20         # seconds any one tmux or git call may take before we give up on it
EPHEMERAL = {".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}  # dropped by stop, not kept
# What a pane must see from the launching shell (the tmux server may have started before you exported them).
FORWARD = re.compile(r"^(PATH|SLURM_CONF|(AUTORESEARCH|ANTHROPIC|OPENAI|CLAUDE|CODEX|HF|UV)_[A-Za-z0-9_]*)$")
# spawn.sh's own overrides: read here, never forwarded to the panes or the tmux server.
SETTINGS = ("CLAUDE_MODEL", "CLAUDE_FLAGS", "CODEX_FLAGS", "AUTORESEARCH_AGENT_CMD", "AGENT_PROMPT", "SLURM_RUN_ARGS",
            "WATCH_INTERVAL", "NUDGE_MESSAGE", "IDLE_PROMPT_REGEX", "IDLE_LINES", "TMUX_SOCKET", "STOP_GRACE",
            "SLURM_TIMEOUT", "CONFIRM_RUN_CMD")
POSIX_CLASSES = {"[:space:]": r"\s", "[:blank:]": r" \t", "[:digit:]": r"\d", "[:alpha:]": "A-Za-z",
                 "[:alnum:]": "A-Za-z0-9", "[:upper:]": "A-Z", "[:lower:]": "a-z"}


class Refusal(Exception):
    """A launch, stop or status that cannot go on, said in one line that names the fix."""


def log(message, stream=None):
    try:
        print(f"[spawn {time.strftime('%H:%M:%S')}] {message}", file=stream or sys.stdout, flush=True)
    except OSError:
        pass  # stop run from inside the session it ends: the terminal is gone, the work goes on


def warn(message):
    log(f"warning: {message}", sys.stderr)


# =============================================================================
# Settings (from spawn.sh's environment), checked before anything is made
# =============================================================================

def seconds(env, name, minimum):
    value = env.get(name, "")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number >= minimum or number == float("inf"):
        raise Refusal(f"{name}={value!r} is not a number of seconds >= {minimum:g}")
    return number


@dataclass
class Settings:
    claude_model: str
    claude_flags: list
    codex_flags: list
    agent_cmd: str
    prompt: str
    slurm_run_args: str
    watch_interval: float
    nudge: str
    idle_regex: str
    idle_lines: int
    tmux_socket: str

    @classmethod
    def from_env(cls, env):
        lines = env.get("IDLE_LINES", "")
        if not re.fullmatch(r"[0-9]{1,3}", lines) or int(lines) < 1:
            raise Refusal(f"IDLE_LINES={lines!r} is not a count of lines from 1 to 999")
        regex = python_regex(env.get("IDLE_PROMPT_REGEX", ""))
        try:
            re.compile(regex)
        except re.error as e:
            raise Refusal(f"IDLE_PROMPT_REGEX is not a regular expression ({e})") from None
        if not env.get("NUDGE_MESSAGE", "").strip():
            raise Refusal("NUDGE_MESSAGE is empty: the watcher would type nothing into an idle pane")
        if not env.get("AGENT_PROMPT", "").strip():
            raise Refusal("AGENT_PROMPT is empty: the agents would start without being told what to do")
        cache = env.get("AUTORESEARCH_CACHE", "")
        if cache and not os.path.isabs(cache):
            raise Refusal(f"AUTORESEARCH_CACHE={cache!r} is relative: each worker would resolve it inside its own "
                          f"worktree; give an absolute path, e.g. {os.path.abspath(os.path.expanduser(cache))}")
        return cls(env.get("CLAUDE_MODEL", ""), env.get("CLAUDE_FLAGS", "").split(), env.get("CODEX_FLAGS", "").split(),
                   env.get("AUTORESEARCH_AGENT_CMD", ""), env["AGENT_PROMPT"], env.get("SLURM_RUN_ARGS", ""),
                   seconds(env, "WATCH_INTERVAL", 1), env["NUDGE_MESSAGE"], regex, int(lines),
                   env.get("TMUX_SOCKET", ""))


def python_regex(pattern):
    """IDLE_PROMPT_REGEX as Python reads it: POSIX classes such as [:space:] (bash's syntax) turned into \\s."""
    for posix, python in POSIX_CLASSES.items():
        pattern = pattern.replace(posix, python)
    return pattern


# =============================================================================
# The repository, git and tmux
# =============================================================================

def run(argv, cwd=None, timeout=TMUX_TIMEOUT, env=None, check=True):
    """stdout of a command; Refusal with its first error line if it fails or hangs (check)."""
    try:
        out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise Refusal(f"{' '.join(argv[:3])} did not answer within {timeout:g} s") from None
    if check and out.returncode != 0:
        why = (out.stderr or out.stdout).strip().splitlines()
        raise Refusal(f"{' '.join(argv[:4])} failed: {why[0] if why else f'exit {out.returncode}'}")
    return out.stdout.strip()


def git(cwd, *args, check=True):
    return run(["git", "-C", str(cwd), *args], check=check)


def ok(*argv):
    """True when a command succeeds (its output discarded); False too when it hangs."""
    try:
        return subprocess.run(argv, capture_output=True, timeout=TMUX_TIMEOUT).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def common_dir(folder):
    """The git common directory of a folder's repository (physical path), or None outside one."""
    out = subprocess.run(["git", "-C", str(folder), "rev-parse", "--path-format=absolute", "--git-common-dir"],
                         capture_output=True, text=True)
    return Path(out.stdout.strip()).resolve() if out.returncode == 0 else None


def find_root(script_dir, cwd):
    """The main worktree of the repository spawn.sh belongs to; refused from inside another repository."""
    own = common_dir(script_dir)
    if own is None:
        raise Refusal(f"spawn.sh in {script_dir} is not inside a git repository: "
                      "run the spawn.sh of a clone of autoresearch")
    here = common_dir(cwd)
    if here is not None and here != own:
        raise Refusal(f"you are in another git repository ({here.parent}): spawn.sh works on its own, "
                      f"{own.parent}; cd there first")
    return own.parent


class Tmux:
    """tmux, on a private server when TMUX_SOCKET is set (tmux -L), without spawn.sh's settings in its env."""

    def __init__(self, socket):
        self.socket = socket
        self.argv = ["tmux", "-L", socket] if socket else ["tmux"]
        self.env = {k: v for k, v in os.environ.items() if k not in SETTINGS}

    def __call__(self, *args, check=True):
        return run([*self.argv, *args], env=self.env, check=check)

    def has_session(self, name):
        try:
            return subprocess.run([*self.argv, "has-session", "-t", f"={name}"], env=self.env,
                                  capture_output=True, timeout=TMUX_TIMEOUT).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def attach_hint(self, session):
        return " ".join(self.argv + ["attach", "-t", session])


# =============================================================================
# Workers and their agents
# =============================================================================

def agent_cmdline(agent, s):
    """The command line that starts <agent> (the prompt not included), or None for an unknown agent."""
    if s.agent_cmd:
        return s.agent_cmd
    if agent in ("claude", "sonnet", "opus", "haiku"):
        model = s.claude_model if agent == "claude" else agent
        return shlex.join(["claude", *s.claude_flags, "--model", model])
    if agent == "codex":
        return shlex.join(["codex", *s.codex_flags])
    return None


def agent_program(cmdline):
    """The program a command line starts: its first word that is not a NAME=value assignment."""
    try:
        words = shlex.split(cmdline)
    except ValueError:
        words = cmdline.split()
    return next((w for w in words if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w)), None)


def check_tag(tag):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", tag):
        raise Refusal(f"invalid tag '{tag}': use letters, digits, '-' and '_' (it names branches and a tmux session)")
    if len(tag) > MAX_TAG:
        raise Refusal(f"invalid tag '{tag[:20]}...': {len(tag)} characters, at most {MAX_TAG} "
                      "(it names branches, files and a tmux session)")
    if not ok("git", "check-ref-format", "--branch", f"autoresearch/{tag}-gpu0"):
        raise Refusal(f"invalid tag '{tag}': not valid in a branch name")


def parse_workers(specs, slurm):
    """[(agent, index)] from agent:N words; indices compared as numbers of at most 4 digits."""
    workers, seen = [], set()
    for spec in specs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+):([0-9]+)", spec)
        if not m:
            raise Refusal(f"bad worker '{spec}': expected <agent>:<index>, e.g. claude:0")
        digits = m.group(2).lstrip("0") or "0"
        if len(digits) > MAX_INDEX_DIGITS:
            raise Refusal(f"bad worker '{spec}': index {m.group(2)} is out of range")
        index = int(digits)
        if index in seen:
            raise Refusal(f"{'worker' if slurm else 'GPU'} {index} is given twice: one agent per "
                          f"{'worker' if slurm else 'GPU'}")
        seen.add(index)
        workers.append((m.group(1), index))
    return workers


def gpu_count(fix="local workers each need an NVIDIA GPU (on a Slurm login node: launch --slurm)"):
    """How many GPUs nvidia-smi lists; Refusal (ending with <fix>) when there is none or it cannot tell."""
    if shutil.which("nvidia-smi") is None:
        raise Refusal(f"no GPU: nvidia-smi not found; {fix}")
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise Refusal(f"no GPU: nvidia-smi -L did not answer within 30 s; {fix}") from None
    if out.returncode != 0:
        first = (out.stderr or out.stdout).strip().splitlines()
        raise Refusal(f"no GPU: nvidia-smi -L failed ({first[0] if first else out.returncode}); {fix}")
    n = sum(bool(re.match(r"GPU [0-9]", line)) for line in out.stdout.splitlines())
    if n == 0:
        raise Refusal(f"no GPU: nvidia-smi lists none; {fix}")
    return n


def job_name(tag, index):
    """The Slurm job name of a worker's runs: stop finds the jobs by it."""
    return f"autoresearch-{tag}-{index}"


def check_srun(env, run_args, fix):
    """srun on the PATH, and SLURM_RUN_ARGS that split on whitespace into what was meant."""
    if shutil.which("srun", path=env.get("PATH")) is None:
        raise Refusal(f"srun not found: --slurm sends each run to Slurm with srun; {fix}")
    if re.search(r"['\"\\]", run_args):
        raise Refusal("SLURM_RUN_ARGS must not contain quotes or backslashes: it is split on whitespace, "
                      "nothing else")


def srun_prefix(name, run_args):
    """The command line that makes a run a Slurm job of one GPU: srun, the job's name, the site's arguments."""
    return f"srun --job-name={name} {run_args}".rstrip()


def pane_exports(env):
    """'export NAME=value; ' for each variable of this shell a pane must see."""
    return "".join(f"export {k}={shlex.quote(v)}; " for k, v in sorted(env.items())
                   if FORWARD.match(k) and k not in SETTINGS)


# =============================================================================
# The manifest: what launch made, for stop
# =============================================================================

@dataclass
class Worker:
    index: int
    agent: str
    branch: str
    worktree: str
    job_name: str | None = None   # --slurm: the name of its runs' jobs
    pane: str = ""                # tmux pane id


@dataclass
class Manifest:
    tag: str
    root: str
    head: str
    launch_id: str                # in every process's environment (AUTORESEARCH_LAUNCH): how stop finds them
    slurm: bool
    tmux_socket: str
    board: str
    watch: dict
    workers: list = field(default_factory=list)
    created: str = field(default_factory=board.now_utc)

    @property
    def session(self):
        return f"autoresearch-{self.tag}"

    def save(self, path):
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        tmp.replace(path)  # readers see the old or the new file, never half of one

    @classmethod
    def load(cls, path):
        data = json.loads(Path(path).read_text())
        data["workers"] = [Worker(**w) for w in data["workers"]]
        return cls(**data)


def manifest_path(root, tag):
    return Path(root) / "worktrees" / f".launch-{tag}.json"


def watcher_log(root, tag):
    return Path(root) / "worktrees" / f".watcher-{tag}.log"


# =============================================================================
# launch
# =============================================================================

@dataclass
class Made:
    """What launch has made so far, undone if it does not finish."""
    branches: list = field(default_factory=list)
    worktrees: list = field(default_factory=list)
    session: str = ""
    files: list = field(default_factory=list)

    def undo(self, root, tmux, launch_id):
        log("launch failed: removing what it made")
        if self.session:
            end_processes(launch_id, end_session(tmux, self.session), grace=2)
        for wt in self.worktrees:
            git(root, "worktree", "remove", "--force", wt, check=False)
        git(root, "worktree", "prune", check=False)
        for branch in self.branches:
            git(root, "branch", "-D", branch, check=False)
        for path in self.files:
            Path(path).unlink(missing_ok=True)


def check_launch(root, args, env):
    """Everything a launch needs, checked before anything is made: (settings, manifest, agents)."""
    slurm = "--slurm" in args
    words = [a for a in args if a != "--slurm"]
    for a in words:
        if a.startswith("--"):
            raise Refusal(f"unknown option '{a}': the only option is --slurm")
    if not words:
        raise Refusal("launch needs a tag and workers: bash spawn.sh launch <tag> [--slurm] <agent:N> [...]")
    tag, specs = words[0], words[1:]
    check_tag(tag)
    if not specs:
        raise Refusal(f"no workers given: bash spawn.sh launch {tag} [--slurm] <agent:N> [...] (e.g. claude:0)")
    workers = parse_workers(specs, slurm)
    s = Settings.from_env(env)
    for agent, _ in workers:
        if agent_cmdline(agent, s) is None:
            raise Refusal(f"unknown agent '{agent}': use claude, sonnet, opus, haiku or codex "
                          "(or set AUTORESEARCH_AGENT_CMD)")
    for agent, _ in workers:
        program = agent_program(agent_cmdline(agent, s))
        if program is None:
            raise Refusal("AUTORESEARCH_AGENT_CMD names no program")
        if shutil.which(program, path=env.get("PATH")) is None:
            raise Refusal(f"agent program '{program}' not found on PATH (agent {agent}): install it, "
                          "or set AUTORESEARCH_AGENT_CMD")
    if slurm:
        check_srun(env, s.slurm_run_args, "launch from a Slurm login node")
    else:
        n = gpu_count()
        for _, gpu in workers:
            if gpu >= n:
                raise Refusal(f"no GPU {gpu}: nvidia-smi lists {n} GPU(s) (indices 0..{n - 1}); "
                              "for Slurm workers use --slurm")

    cwd_root = common_dir(".")
    head = git("." if cwd_root else root, "rev-parse", "--verify", "--quiet", "HEAD", check=False)
    if not head:
        raise Refusal("this repository has no commit to branch from")
    for name in ("worktrees", "results"):
        if (root / name).exists() and not (root / name).is_dir():
            raise Refusal(f"{root / name} is a file, not a folder: launch puts the night's {name} there; move it away")
    git(root, "worktree", "prune")
    tmux = Tmux(s.tmux_socket)
    if tmux.has_session(f"autoresearch-{tag}"):
        raise Refusal(f"tmux session autoresearch-{tag} already exists: bash spawn.sh stop {tag}")
    for _, index in workers:
        branch = f"autoresearch/{tag}-gpu{index}"
        if ok("git", "-C", str(root), "show-ref", "--verify", "--quiet", f"refs/heads/{branch}"):
            raise Refusal(f"branch {branch} exists (branches of past runs are kept): pick a new tag")
        if os.path.lexists(root / "worktrees" / f"gpu{index}"):
            raise Refusal(f"worktrees/gpu{index} exists (another run on GPU {index}?): stop that run first")
    board_path = board.board_file(root, tag)
    for path, what in ((board_path, "the board of a past night"), (manifest_path(root, tag), "a launch's record")):
        if os.path.lexists(path):
            raise Refusal(f"{path.relative_to(root)} exists ({what} with this tag): pick a new tag")

    m = Manifest(tag=tag, root=str(root), head=head, launch_id=f"{tag}-{secrets.token_hex(6)}", slurm=slurm,
                 tmux_socket=s.tmux_socket, board=str(board_path),
                 watch={"interval": s.watch_interval, "nudge": s.nudge, "regex": s.idle_regex, "lines": s.idle_lines})
    for agent, index in workers:
        m.workers.append(Worker(index, agent, f"autoresearch/{tag}-gpu{index}", str(root / "worktrees" / f"gpu{index}"),
                                job_name(tag, index) if slurm else None))

    # Worth a word, not a refusal.
    if git(".", "status", "--porcelain", "--untracked-files=no", check=False):
        warn(f"uncommitted changes are not part of the workers' starting point ({head[:7]})")
    if not ok("git", "-C", str(root), "cat-file", "-e", f"{head}:program.md"):
        warn(f"program.md is not in commit {head[:7]}: the agents' prompt points at it")
    if not (root / ".venv").is_dir():
        warn(f"no .venv in {root} (run 'uv sync' there): workers' 'uv run' will build their own")
    return s, m


def pane_command(m, w, s, env):
    """What a worker's pane runs: the agent with the prompt, then a note that it ended, then a shell."""
    night = (f"export AUTORESEARCH_LAUNCH={shlex.quote(m.launch_id)} AUTORESEARCH_TAG={shlex.quote(m.tag)} "
             f"AUTORESEARCH_WORKER=gpu{w.index} AUTORESEARCH_BOARD={shlex.quote(m.board)}; ")
    if m.slurm:
        prefix = srun_prefix(w.job_name, s.slurm_run_args)
        where = f"unset CUDA_VISIBLE_DEVICES; export AUTORESEARCH_RUN={shlex.quote(prefix)}; "
        label = f"worker {w.index} (Slurm job {w.job_name})"
    else:
        where = f"export CUDA_VISIBLE_DEVICES={w.index} AUTORESEARCH_RUN=; "
        label = f"GPU {w.index}"
    return (pane_exports(env) + night + where + agent_cmdline(w.agent, s) + " " + shlex.quote(s.prompt)
            + "; rc=$?; tmux set-option -p @autoresearch_done 1 2>/dev/null"
            + f"; printf '\\n[agent exited with status %s: session ended on %s]\\n' \"$rc\" {shlex.quote(label)}"
            + "; exec bash")


def launch(root, args, env):
    s, m = check_launch(root, args, env)
    tmux = Tmux(s.tmux_socket)
    made = Made()
    where = f"Slurm (srun {s.slurm_run_args})" if m.slurm else "local GPUs"
    log(f"launching {m.session} from {m.head[:7]} with {len(m.workers)} worker(s), runs on {where}")
    try:
        for name in ("worktrees", "results"):
            (root / name).mkdir(exist_ok=True)
        mpath = manifest_path(root, m.tag)
        made.files += [str(mpath), m.board]
        m.save(mpath)
        board.create(m.board)
        for w in m.workers:
            made.branches.append(w.branch)  # before: a failed add may leave either behind
            made.worktrees.append(w.worktree)
            git(root, "worktree", "add", "--quiet", "-b", w.branch, w.worktree, m.head)
            if (root / ".venv").is_dir():
                Path(w.worktree, ".venv").symlink_to(root / ".venv")
                if not ok("git", "-C", w.worktree, "check-ignore", "-q", ".venv"):
                    warn(f"the .venv link in worktrees/gpu{w.index} is not git-ignored: add '.venv' (no slash) "
                         "to .gitignore")
            cmd = ["bash", "-c", pane_command(m, w, s, env)]
            if not made.session:
                w.pane = tmux("new-session", "-d", "-s", m.session, "-n", "workers", "-x", "220", "-y", "60",
                              "-c", w.worktree, "-P", "-F", "#{pane_id}", *cmd)
                made.session = m.session
                tmux("set-option", "-t", f"={m.session}:", "pane-border-status", "top")
                tmux("set-option", "-t", f"={m.session}:", "pane-border-format", " #{@worker} ")
            else:
                w.pane = tmux("split-window", "-t", f"={m.session}:workers", "-c", w.worktree,
                              "-P", "-F", "#{pane_id}", *cmd)
                tmux("select-layout", "-t", f"={m.session}:workers", "tiled")
            tmux("set-option", "-p", "-t", w.pane, "@worker", f"gpu{w.index} {w.agent} {w.branch}")
            m.save(mpath)
            runs = f"Slurm job {w.job_name}" if m.slurm else f"GPU {w.index}"
            log(f"gpu{w.index}: {w.agent} on {w.branch} in worktrees/gpu{w.index}, runs on {runs}")
        # The watcher: the session's second window, out of sight; ending the session ends it.
        watcher = (f"export AUTORESEARCH_LAUNCH={shlex.quote(m.launch_id)}; exec {shlex.quote(sys.executable)} "
                   f"{shlex.quote(str(Path(__file__).resolve()))} _watch {shlex.quote(str(mpath))}")
        tmux("new-window", "-d", "-t", f"={m.session}:", "-n", "watcher", "-c", str(root), "bash", "-c", watcher)
    except BaseException as e:
        if isinstance(e, (Refusal, OSError)):
            log(f"error: {e}", sys.stderr)
        made.undo(root, tmux, m.launch_id)
        if isinstance(e, (Refusal, OSError)):
            return 1
        raise
    log(f"watcher: window 'watcher' of {m.session}, nudges idle panes every {s.watch_interval:g} s "
        f"(log: worktrees/.watcher-{m.tag}.log)")
    log(f"board: {Path(m.board).relative_to(root)} (each worker: bash spawn.sh board)")
    log(f"attach: {tmux.attach_hint(m.session)}    stop: bash spawn.sh stop {m.tag}")
    return 0


# =============================================================================
# The watcher: nudges a pane that sits idle at its prompt
# =============================================================================

def looks_idle(screen, regex, lines):
    """True when one of the last <lines> non-empty lines of a screen looks like an agent's input prompt."""
    last = [line for line in screen.split("\n") if line.strip()][-lines:]
    return any(regex.search(line) for line in last)


def watch(mpath):
    m = Manifest.load(mpath)
    tmux = Tmux(m.tmux_socket)
    regex = re.compile(m.watch["regex"])
    out = open(watcher_log(m.root, m.tag), "a", buffering=1)

    def say(message):
        line = f"[spawn {time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        out.write(line + "\n")

    say(f"watching {m.session} every {m.watch['interval']:g} s")
    last = {}
    fmt = "#{pane_id}\t#{pane_dead}\t#{?@autoresearch_done,1,0}\t#{@worker}"
    while True:
        time.sleep(m.watch["interval"])
        if not tmux.has_session(m.session):
            break
        for line in tmux("list-panes", "-s", "-t", f"={m.session}", "-F", fmt, check=False).splitlines():
            pane, dead, done, worker = (line.split("\t") + ["", "", ""])[:4]
            if not worker or dead == "1" or done == "1":
                continue  # this window, or an agent that ended
            screen = tmux("capture-pane", "-p", "-t", pane, check=False)
            if last.get(pane) == screen and looks_idle(screen, regex, m.watch["lines"]):
                say(f"nudging {pane} ({worker})")
                tmux("send-keys", "-t", pane, "-l", m.watch["nudge"], check=False)
                time.sleep(0.3)  # let a TUI take the text before the Enter
                tmux("send-keys", "-t", pane, "Enter", check=False)
                screen = tmux("capture-pane", "-p", "-t", pane, check=False)
            last[pane] = screen
    say(f"session {m.session} is gone: watcher exits")
    return 0


# =============================================================================
# stop: end everything the night started, keep everything it produced
# =============================================================================

def _proc(pid):
    """(state, session id, comm) of a process, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[3]), comm  # after the name: state, ppid, pgrp, session, ...


def _ancestors():
    pids, pid = {os.getpid()}, os.getpid()
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        pids.add(pid)
    return pids


def night_processes(launch_id, sessions):
    """{pid: name} of the live processes a night started: AUTORESEARCH_LAUNCH=<id> in their environment
    (inherited by everything an agent starts, also in a process group or session of its own, such as
    program.md's `timeout 600 uv run train.py`), or in a pane's process session."""
    marker = f"AUTORESEARCH_LAUNCH={launch_id}".encode() if launch_id else None
    skip, found = _ancestors(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        info = _proc(entry)
        if info is None or info[0] in "ZX":
            continue
        ours = info[1] in sessions
        if not ours and marker:
            try:
                ours = marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            except OSError:
                pass  # another user's process, or gone
        if ours:
            found[int(entry)] = info[2]
    return found


def end_session(tmux, session):
    """End a tmux session; the process sessions of its panes (their shells' pids), read just before."""
    if not tmux.has_session(session):
        return set()
    pids = tmux("list-panes", "-s", "-t", f"={session}", "-F", "#{pane_pid}", check=False).split()
    tmux("kill-session", "-t", f"={session}", check=False)
    return {int(p) for p in pids if p.isdigit()}


def end_processes(launch_id, sessions, grace):
    """TERM every process of the night, KILL what is left after <grace> s; {pid: (name, signal)}."""
    if not Path("/proc").is_dir():
        warn("no /proc here: cannot look for processes the night left running")
        return {}
    ended, deadline, sig = {}, time.monotonic() + grace, signal.SIGTERM
    while True:
        alive = night_processes(launch_id, sessions)
        if not alive:
            break
        if time.monotonic() > deadline:
            if sig == signal.SIGKILL and time.monotonic() > deadline + 5:
                warn(f"still running after KILL: {', '.join(f'{p} {n}' for p, n in alive.items())}")
                break
            sig = signal.SIGKILL
        for pid, name in alive.items():
            if pid in ended and ended[pid][1] == sig.name:
                continue
            try:
                os.kill(pid, sig)
                ended[pid] = (name, sig.name)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.1)
    return ended


def say_ended(ended, grace):
    if not ended:
        log("no process of the night outlived its session")
        return
    names = [f"{pid} {name}" for pid, (name, _) in sorted(ended.items())]
    listed = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    killed = [f"{pid} {name}" for pid, (name, sig) in sorted(ended.items()) if sig == "SIGKILL"]
    log(f"ended {len(ended)} process(es) the night started: {listed}"
        + (f"; {len(killed)} ignored TERM for {grace:g} s and got KILL: {', '.join(killed[:12])}" if killed else ""))


def slurm_jobs(tags, timeout):
    """[(id, name, state, time)] of this user's jobs of these tags; Refusal naming why squeue gave none."""
    if shutil.which("squeue") is None:
        raise Refusal("squeue not found")
    user = run(["id", "-un"])
    out = run(["squeue", "-h", "-u", user, "-o", "%i|%j|%T|%M"], timeout=timeout)
    pattern = re.compile(rf"^autoresearch-({'|'.join(map(re.escape, tags))})-[0-9]+$")
    return [tuple(line.split("|")) for line in out.splitlines() if len(line.split("|")) == 4
            and pattern.match(line.split("|")[1])]


def cancel_jobs(tag, timeout):
    manual = f"cancel its jobs yourself: scancel --name={job_name(tag, '<N>')}"
    try:
        jobs = slurm_jobs([tag], timeout)
    except Refusal as e:
        warn(f"{e}: {manual}")
        return False
    if not jobs:
        return False
    ids = [job[0] for job in jobs]
    try:
        run(["scancel", *ids], timeout=timeout)
        log(f"Slurm job(s) {' '.join(ids)} cancelled")
    except Refusal as e:
        warn(f"{e}: {manual}")
    return True


def free_results_name(root, name):
    """<name>, or the first <name>-<k> with neither results/<..>.tsv nor results/<..>/ taken."""
    candidate, k = name, 2
    while os.path.lexists(root / "results" / f"{candidate}.tsv") or os.path.lexists(root / "results" / candidate):
        candidate, k = f"{name}-{k}", k + 1
    return candidate


def tracked_files(root, wt, revisions):
    """The paths git tracks in the first of <revisions> that exists (a worktree's HEAD, its branch...)."""
    for rev in revisions:
        if rev:
            out = subprocess.run(["git", "-C", str(root), "ls-tree", "-r", "-z", "--name-only", rev],
                                 capture_output=True)
            if out.returncode == 0:
                return {p.decode("utf-8", "surrogateescape") for p in out.stdout.split(b"\0") if p}
    return None


def untracked_files(wt, tracked):
    """Relative paths under <wt> that git does not track: an agent's notes, logs, plots (caches left out)."""
    found = []
    for folder, dirs, files in os.walk(wt):
        rel_folder = Path(folder).relative_to(wt)
        for d in list(dirs):
            if d in EPHEMERAL or (rel_folder == Path(".") and d == ".git"):
                dirs.remove(d)
            elif os.path.islink(Path(folder, d)):
                dirs.remove(d)
                files.append(d)  # a link to a folder: kept as the link
        for f in files:
            rel = (rel_folder / f).as_posix()
            if rel in (".git", "results.tsv") or f.endswith(".pyc") or rel in tracked:
                continue
            found.append(rel)
    return sorted(found)


def retire_worktree(root, tag, wt, revisions):
    """Move a worktree's results.tsv to results/<tag>-gpu<N>.tsv and everything else it made to
    results/<tag>-gpu<N>/ (uncommitted changes as uncommitted.diff), then remove the worktree."""
    name = free_results_name(root, f"{tag}-{wt.name}")
    keep = root / "results" / name
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731
    if (wt / "results.tsv").is_file():
        (root / "results").mkdir(exist_ok=True)
        shutil.move(wt / "results.tsv", f"{keep}.tsv")
        log(f"results: {rel(f'{keep}.tsv')} ({count_rows(f'{keep}.tsv')} rows)")
    has_git = (wt / ".git").exists()
    head = git(wt, "rev-parse", "--verify", "--quiet", "HEAD", check=False) if has_git else ""
    tracked = tracked_files(root, wt, [head, *revisions])
    if tracked is None:
        warn(f"cannot tell which files of {rel(wt)} git tracks: none of them kept")
        tracked = set()
    extra = untracked_files(wt, tracked)
    diff = subprocess.run(["git", "-C", str(wt), "diff", "--binary", "HEAD"], capture_output=True).stdout \
        if has_git else b""
    for path in extra:
        (keep / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(wt / path, keep / path)
    if diff:
        keep.mkdir(parents=True, exist_ok=True)
        (keep / "uncommitted.diff").write_bytes(diff)
    if extra or diff:
        shown = ", ".join(extra[:6]) + (f" and {len(extra) - 6} more" if len(extra) > 6 else "")
        log(f"kept in {rel(keep)}/: " + (f"{len(extra)} untracked file(s) ({shown})" if extra else "")
            + ("; " if extra and diff else "") + ("uncommitted changes as uncommitted.diff" if diff else ""))
    # git refuses a worktree whose .git is gone; then the folder goes by hand, and only below worktrees/.
    if not ok("git", "-C", str(root), "worktree", "remove", "--force", str(wt)):
        if root / "worktrees" not in wt.parents:
            warn(f"{wt} is not below worktrees/: left in place")
            return
        shutil.rmtree(wt)
    log(f"worktree {rel(wt)} removed")


def tag_branches(root, tag):
    out = git(root, "for-each-ref", "--format=%(refname:short)", f"refs/heads/autoresearch/{tag}-gpu*")
    return [b for b in out.splitlines() if re.fullmatch(rf"autoresearch/{re.escape(tag)}-gpu[0-9]+", b)]


def worktree_list(root):
    """[(path, branch or None)] of every worktree git knows, the main one first."""
    out = []
    for block in git(root, "worktree", "list", "--porcelain").split("\n\n"):
        lines = block.splitlines()
        path = next((line[len("worktree "):] for line in lines if line.startswith("worktree ")), None)
        branch = next((line[len("branch refs/heads/"):] for line in lines if line.startswith("branch refs/heads/")), None)
        if path:
            out.append((path, branch))
    return out


def stop(root, args, env):
    if len(args) != 1:
        raise Refusal("stop needs exactly one tag: bash spawn.sh stop <tag>")
    tag = args[0]
    check_tag(tag)
    grace = seconds(env, "STOP_GRACE", 0)
    timeout = seconds(env, "SLURM_TIMEOUT", 1)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # run from a pane of the night, it outlives the session's end
    mpath = manifest_path(root, tag)
    m = None
    if mpath.exists():
        try:
            m = Manifest.load(mpath)
        except (ValueError, TypeError, KeyError, OSError) as e:
            warn(f"{mpath.relative_to(root)} is unreadable ({e}): ending what tmux and git show")
    tmux = Tmux(m.tmux_socket if m else env.get("TMUX_SOCKET", ""))
    session, did = f"autoresearch-{tag}", False

    # 1. The session (its panes and the watcher window), 2. whatever its processes started, 3. Slurm jobs.
    # The panes' process sessions are read from live panes only: a pid on record could be another's by now.
    sessions = end_session(tmux, session)
    if sessions:
        log(f"tmux session {session} ended")
        did = True
    if m is not None or sessions:  # without a record, what ran in the panes' sessions
        ended = end_processes(m.launch_id if m else None, sessions, grace)
        say_ended(ended, grace)
        did |= bool(ended)
    if m is not None and m.slurm:
        did |= cancel_jobs(tag, timeout)

    # 4. The worktrees: those launch recorded, and any with one of the tag's branches checked out.
    branches = {w.worktree: w.branch for w in m.workers} if m else {}
    by_branch = {branch: path for path, branch in worktree_list(root) if branch}
    for branch in tag_branches(root, tag):
        if branch in by_branch:
            branches.setdefault(by_branch[branch], branch)
    for wt_path, branch in branches.items():
        wt = Path(wt_path)
        if not wt.is_dir():
            continue
        if (wt / ".git").exists():
            now = git(wt, "symbolic-ref", "--quiet", "--short", "HEAD", check=False)
            if now.startswith("autoresearch/") and not re.fullmatch(rf"autoresearch/{re.escape(tag)}-gpu[0-9]+", now):
                warn(f"{os.path.relpath(wt, root)} now belongs to {now}: left in place")
                continue
        retire_worktree(root, tag, wt, [branch, m.head if m else None])
        did = True
    mpath.unlink(missing_ok=True)
    git(root, "worktree", "prune", check=False)
    board_path = board.board_file(root, tag)
    if did and board_path.is_file():
        log(f"board: {board_path.relative_to(root)} ({len(board.read(board_path)[0])} rows)")
    if did:
        log(f"branches kept: {' '.join(tag_branches(root, tag))}")
    else:
        log(f"nothing running for tag {tag}")
    return 0


# =============================================================================
# status
# =============================================================================

def count_rows(path):
    """Rows of a TSV file: its non-blank lines but the header."""
    lines = [line for line in Path(path).read_text(errors="replace").split("\n") if line.strip()]
    return max(len(lines) - 1, 0)


def listing(items):
    for item in items:
        print(f"  {item}")
    if not items:
        print("  none")


def status(root, args, env):
    if args:
        raise Refusal(f"status takes no arguments (got {' '.join(args)}): bash spawn.sh status")
    manifests = {}
    for path in sorted((root / "worktrees").glob(".launch-*.json")):
        try:
            m = Manifest.load(path)
            manifests[m.tag] = m
        except (ValueError, TypeError, KeyError, OSError):
            continue
    tmux = Tmux(env.get("TMUX_SOCKET", ""))
    log("tmux sessions:")
    sessions = []
    out = tmux("list-sessions", "-F", "#{session_name}\t#{session_windows}\t#{t:session_created}", check=False)
    for line in out.splitlines():
        name, windows, created = (line.split("\t") + ["", ""])[:3]
        if not name.startswith("autoresearch-"):
            continue
        pid = tmux("list-panes", "-t", f"={name}:watcher", "-F", "#{pane_pid}", check=False)
        watcher = f"watcher pid {pid}" if pid.isdigit() else "no watcher"
        sessions.append(f"{name} {windows} window(s), created {created} ({watcher})")
    listing(sessions)

    log("worktrees:")
    listing([f"{os.path.relpath(path, root)} ({branch or 'no branch'})" for path, branch in worktree_list(root)
             if path.startswith(f"{root}/worktrees/")])

    log("research branches:")
    listing(git(root, "for-each-ref", "--format=%(refname:short) %(objectname:short) %(subject)",
                "refs/heads/autoresearch/").splitlines())

    log("results files:")
    files = sorted((root / "worktrees").glob("gpu*/results.tsv")) + sorted((root / "results").glob("*.tsv"))
    listing([f"{f.relative_to(root)} ({count_rows(f)} rows)" for f in files if f.is_file()])

    slurm_tags = [tag for tag, m in manifests.items() if m.slurm]
    if slurm_tags:  # squeue only for Slurm launches: with no controller it would hang
        log("Slurm jobs (id|name|state|time):")
        try:
            listing(["|".join(job) for job in slurm_jobs(slurm_tags, seconds(env, "SLURM_TIMEOUT", 1))])
        except Refusal as e:
            listing([f"unavailable ({e})"])
    return 0


# =============================================================================
# Command line
# =============================================================================

COMMANDS = ("launch", "stop", "status", "board", "confirm")


def main(argv=None, env=None):
    argv = sys.argv[1:] if argv is None else argv
    env = dict(os.environ if env is None else env)
    if argv[:1] == ["_watch"]:
        return watch(argv[1])
    try:
        if not argv:
            raise Refusal("no command given: bash spawn.sh launch|stop|status|board|confirm|help")
        command, rest = argv[0], argv[1:]
        if command not in COMMANDS:
            raise Refusal(f"unknown command '{command}': use launch, stop, status, board, confirm or help")
        for tool in ("git",) if command in ("board", "confirm") else ("git", "tmux"):
            if shutil.which(tool, path=env.get("PATH")) is None:
                raise Refusal(f"{tool} not found: install {tool} (e.g. apt-get install {tool})")
        script_dir = Path(__file__).resolve().parent.parent
        if command == "board":
            root = common_dir(script_dir)
            return board.main(rest, env, root=root.parent if root else ".")
        root = find_root(script_dir, Path.cwd())
        if command == "confirm":  # its own module, which catches its own refusals
            from autoresearch import confirm
            return confirm.main(root, rest, env)
        return {"launch": launch, "stop": stop, "status": status}[command](root, rest, env)
    except Refusal as e:
        log(f"error: {e}", sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
