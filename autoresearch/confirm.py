"""
The morning's confirmation: the night's baseline and best commits, each run at K
seeds the loop never used, so that the night's gain is a mean with its spread,
not one draw picked as the best of a hundred.

    bash spawn.sh confirm <tag> [K] [--slurm]     # K seeds (default 3): 1, 2, ..., K
    uv run analysis.py results/<tag>-confirm.tsv  # the gain: mean +- sd over the seeds

Holds the confirm file's format, its reader and the pairing of its runs
(analysis.py reports them), and the command, which launch.py hands `confirm`
to. Stdlib only; imports autoresearch.board and autoresearch.launch (its GPU
list, srun prefix, git and refusals). Nothing here is run at import.

What the command does. From results/<tag>-board.tsv: the baseline is the
first keep row (the launch commit, which every worker ran first), the best the
night's lowest keep row. Each (commit, seed) run gets a temporary git worktree,
worktrees/confirm-<tag>/<commit>-seed<s>, detached at the commit with the
repository's .venv linked, and runs CONFIRM_RUN_CMD (default program.md's
`timeout 600 uv run train.py`) there with AUTORESEARCH_SEED=<s>; its output
goes to results/<tag>-confirm/<commit>-seed<s>.log and a row is appended to
results/<tag>-confirm.tsv. The night's path: on local GPUs one run per free
GPU at a time (CUDA_VISIBLE_DEVICES=<i>; free: listed by `nvidia-smi -L` and
held by no running night), or with --slurm every run at once as
`srun --job-name=autoresearch-<tag>-confirm $SLURM_RUN_ARGS` (Slurm queues
them). A run already in the file with a number is not run again: re-running
resumes, and a larger K adds seeds. Every input is checked before anything is
made; the worktrees are removed at the end, also after a failure, Ctrl-C or
TERM (which end the runs, and cancel the Slurm jobs).

Seeds 1..K: the loop runs at 42 (and confirms at 43), and the night's best was
chosen at 42, so a gain measured there carries the luck of that choice; at
seeds it never saw, it carries none.

The file, tab-separated, one header line, then a row per run:

    time  role  commit  seed  val_bpb  memory_gb  data  where  note

role baseline | best; commit 7 characters; val_bpb 6 decimals, '-' when the
run gave none; data the run's data fingerprint; where gpu<N> or slurm; note
why a run gave no number (its exit status, or a summary without the seed asked
for: a train.py that ignores AUTORESEARCH_SEED).
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from autoresearch import board, launch
from autoresearch.launch import Refusal, log, warn

COLUMNS = ("time", "role", "commit", "seed", "val_bpb", "memory_gb", "data", "where", "note")
ROLES = ("baseline", "best")
DEFAULT_K = 3
DEFAULT_RUN_CMD = "timeout 600 uv run train.py"   # program.md's run, without its redirection
GRACE = 10                                        # seconds between TERM and KILL when interrupted


# =============================================================================
# The file
# =============================================================================

@dataclass
class Run:
    line: int
    time: str
    role: str
    commit: str
    seed: int
    val_bpb: float | None
    memory_gb: float | None
    data: str
    where: str
    note: str

    def to_line(self):
        number = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        fields = (self.time, self.role, self.commit, self.seed, number(self.val_bpb, ".6f"),
                  number(self.memory_gb, ".1f"), self.data or "-", self.where, self.note or "-")
        return "\t".join(board.clean(f) for f in fields) + "\n"


def confirm_file(root, tag):
    return Path(root) / "results" / f"{tag}-confirm.tsv"


def is_confirm_file(path):
    """True for a confirm file: its header starts time, role, commit."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    return [c.strip().lower() for c in first.split("\t")[:3]] == list(COLUMNS[:3])


def read(path):
    """Every well-formed row of a confirm file, and "file:line: why" warnings for the rest."""
    runs, warnings = [], []
    for number, line in board.lines_of(board.read_text(path)):
        where = f"{path}:{number}"
        fields = [f.strip() for f in line.split("\t")]
        if not line.strip() or [f.lower() for f in fields[:3]] == list(COLUMNS[:3]):
            continue
        if len(fields) != len(COLUMNS):
            warnings.append(f"{where}: expected {len(COLUMNS)} tab-separated columns, found {len(fields)}; skipped")
            continue
        stamp, role, commit, seed, val, mem, data, ran_on, note = fields
        try:
            seed_n = int(seed)
            val_bpb = None if val == "-" else float(val)
            memory_gb = None if mem == "-" else float(mem)
        except ValueError:
            warnings.append(f"{where}: seed {seed!r}, val_bpb {val!r} or memory_gb {mem!r} is not a number; skipped")
            continue
        rule = board.implausible("discard", val_bpb) if val_bpb is not None else None
        if role not in ROLES or rule:
            warnings.append(f"{where}: " + (f"role {role!r} is not baseline or best" if role not in ROLES else rule)
                            + "; skipped")
            continue
        runs.append(Run(number, stamp, role, commit, seed_n, val_bpb, memory_gb, data, ran_on, note))
    return runs, warnings


def pairs(runs):
    """The night's gain seed by seed: the latest baseline and best commits of the file, and for each seed
    at which both gave a number on the same data, the mean of each (several runs at one seed: a
    re-run) and gain = baseline - best (> 0: the best is better)."""
    latest = {r.role: r.commit for r in runs}
    if set(latest) != set(ROLES):
        return latest, []
    values = {}
    for r in runs:
        if r.val_bpb is not None and r.commit == latest[r.role]:
            values.setdefault((r.seed, r.data), {}).setdefault(r.role, []).append(r.val_bpb)
    out = []
    for (seed, data), v in sorted(values.items()):
        if set(v) == set(ROLES):
            base, best = (sum(v[role]) / len(v[role]) for role in ROLES)
            out.append({"seed": seed, "data": data, "baseline": round(base, 6), "best": round(best, 6),
                        "gain": round(base - best, 6)})
    return latest, out


def night_ends(entries):
    """The board's baseline (its first keep row: the launch commit, which every worker ran first) and best
    (its lowest keep row), as {"baseline": Entry, "best": Entry}; None without a keep row."""
    kept = [e for e in entries if e.status == "keep"]
    return {"baseline": kept[0], "best": min(kept, key=lambda e: e.val_bpb)} if kept else None


def gain_stats(found):
    """mean, sample standard deviation (None for one seed), min, max and wins of the per-seed gains."""
    gains = [p["gain"] for p in found]
    if not gains:
        return None
    mean = sum(gains) / len(gains)
    sd = (sum((g - mean) ** 2 for g in gains) / (len(gains) - 1)) ** 0.5 if len(gains) > 1 else None
    return {"seeds": len(gains), "mean": round(mean, 6), "sd": None if sd is None else round(sd, 6),
            "min": min(gains), "max": max(gains), "wins": sum(g > 0 for g in gains)}


# =============================================================================
# The command: check everything, then run
# =============================================================================

@dataclass
class Plan:
    tag: str
    root: Path
    file: Path
    logs: Path
    worktrees: Path
    commits: dict        # role -> full hash
    night: dict          # role -> the board's entry
    seeds: list
    jobs: list           # [(role, seed)] still to run
    slurm: bool
    gpus: list           # local: the free GPU indices
    run_cmd: str
    run_args: str        # --slurm: SLURM_RUN_ARGS


def parse_args(args):
    slurm = "--slurm" in args
    words = [a for a in args if a != "--slurm"]
    for a in words:
        if a.startswith("-"):
            raise Refusal(f"unknown option '{a}': bash spawn.sh confirm <tag> [K] [--slurm]")
    if not words or len(words) > 2:
        raise Refusal("confirm needs a tag and at most a number of seeds: bash spawn.sh confirm <tag> [K] [--slurm]")
    tag = words[0]
    k = words[1] if len(words) > 1 else str(DEFAULT_K)
    if not re.fullmatch(r"[0-9]{1,4}", k) or int(k) < 1:
        raise Refusal(f"K={k!r}: the number of seeds must be a whole number from 1 (default {DEFAULT_K})")
    return tag, int(k), slurm


def free_gpus(root, n):
    """The GPU indices 0..n-1 that no running night holds (its launch record in worktrees/)."""
    busy = set()
    for path in (root / "worktrees").glob(".launch-*.json"):
        try:
            m = launch.Manifest.load(path)
        except (ValueError, TypeError, KeyError, OSError):
            continue
        if not m.slurm:
            busy |= {w.index for w in m.workers}
    return [i for i in range(n) if i not in busy]


def check(root, args, env):
    """Everything a confirmation needs, checked before anything is made: a Plan."""
    tag, k, slurm = parse_args(args)
    launch.check_tag(tag)
    path = board.board_file(root, tag)
    if not path.is_file():
        if launch.tag_branches(root, tag):
            raise Refusal(f"no board for {tag} ({path.relative_to(root)} is missing): confirm reads the night's "
                          "best from it")
        raise Refusal(f"unknown tag '{tag}': no board {path.relative_to(root)} and no branch autoresearch/{tag}-gpu*")
    if launch.manifest_path(root, tag).exists():
        raise Refusal(f"the night {tag} still runs (its best may change): bash spawn.sh stop {tag} first")
    night = night_ends(board.read(path)[0])
    if night is None:
        raise Refusal(f"{path.relative_to(root)} has no kept result: nothing to confirm")
    if night["best"].commit[:7] == night["baseline"].commit[:7]:
        raise Refusal(f"the night {tag} kept nothing better than its baseline {night['baseline'].commit}: "
                      "nothing to confirm")
    if not board.comparable(night["baseline"].data, night["best"].data):
        raise Refusal(f"the baseline ran on data {night['baseline'].data}, the best on {night['best'].data}: "
                      "their val_bpb do not compare")
    commits = {}
    for role, e in night.items():
        full = launch.git(root, "rev-parse", "--verify", "--quiet", f"{e.commit}^{{commit}}", check=False)
        if not full:
            raise Refusal(f"the {role} commit {e.commit} is not in {root}: confirm runs in the night's repository")
        commits[role] = full
    for name in ("worktrees", "results"):
        if (root / name).exists() and not (root / name).is_dir():
            raise Refusal(f"{root / name} is a file, not a folder: confirm puts its {name} there; move it away")
    worktrees = root / "worktrees" / f"confirm-{tag}"
    if os.path.lexists(worktrees):
        raise Refusal(f"{worktrees.relative_to(root)} exists: another confirm of {tag} runs? If none does: "
                      f"rm -rf {worktrees.relative_to(root)} && git worktree prune")
    file = confirm_file(root, tag)
    done = set()
    if file.is_file():
        done = {(r.commit, r.seed) for r in read(file)[0] if r.val_bpb is not None}
    seeds = list(range(1, k + 1))
    jobs = [(role, s) for s in seeds for role in ROLES if (commits[role][:7], s) not in done]
    run_cmd = env.get("CONFIRM_RUN_CMD", DEFAULT_RUN_CMD).strip()
    if not run_cmd:
        raise Refusal("CONFIRM_RUN_CMD is empty: nothing to run")
    run_args = env.get("SLURM_RUN_ARGS", "")
    gpus = []
    if slurm:
        launch.check_srun(env, run_args, "confirm from a Slurm login node")
    else:
        n = launch.gpu_count(fix="confirm runs on this machine's NVIDIA GPUs (on a Slurm login node: confirm --slurm)")
        gpus = free_gpus(root, n)
        if not gpus:
            raise Refusal(f"all {n} GPU(s) are held by running nights: stop one, or confirm --slurm")
    return Plan(tag, root, file, root / "results" / f"{tag}-confirm", worktrees, commits, night, seeds, jobs, slurm,
                gpus, run_cmd, run_args)


class Runner:
    """The runs of a plan, one thread per GPU (or per Slurm job), and what interrupting them needs."""

    def __init__(self, plan, env):
        self.plan, self.env = plan, env
        self.git_lock = threading.Lock()    # one worktree add or remove at a time: they share .git
        self.procs = {}                     # pid -> Popen, of the runs going now
        self.made = []                      # worktrees made, removed at the end
        self.stopping = threading.Event()
        self.failed = 0

    def worktree(self, role, seed):
        wt = self.plan.worktrees / f"{self.plan.commits[role][:7]}-seed{seed}"
        with self.git_lock:
            if self.stopping.is_set():  # cleanup may have begun: make nothing more
                raise Refusal("stopped")
            self.made.append(wt)
            launch.git(self.plan.root, "worktree", "add", "--quiet", "--detach", str(wt), self.plan.commits[role])
        venv = self.plan.root / ".venv"
        if venv.is_dir():
            (wt / ".venv").symlink_to(venv)
        return wt

    def remove(self, wt):
        with self.git_lock:
            launch.git(self.plan.root, "worktree", "remove", "--force", str(wt), check=False)

    def run(self, role, seed, gpu):
        """One run: its worktree, the command, its row. Returns when it is done (or stopped)."""
        p, commit = self.plan, self.plan.commits[role][:7]
        wt = self.worktree(role, seed)
        env = {k: v for k, v in self.env.items() if k not in launch.SETTINGS}
        env.update(AUTORESEARCH_SEED=str(seed), AUTORESEARCH_RUN="")
        argv = ["bash", "-c", p.run_cmd]
        if p.slurm:
            env.pop("CUDA_VISIBLE_DEVICES", None)
            argv = launch.srun_prefix(f"autoresearch-{p.tag}-confirm", p.run_args).split() + argv
            where = "slurm"
        else:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
            where = f"gpu{gpu}"
        out = p.logs / f"{commit}-seed{seed}.log"
        try:
            with open(out, "wb") as f:
                proc = subprocess.Popen(argv, cwd=wt, env=env, stdout=f, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
                self.procs[proc.pid] = proc
                if self.stopping.is_set():  # stop_runs may have looked before this run was listed
                    os.killpg(proc.pid, signal.SIGTERM)
                rc = proc.wait()
                self.procs.pop(proc.pid, None)
        finally:
            self.remove(wt)
        if self.stopping.is_set():
            return  # an interrupted run: no row, it runs again next time
        identity = board.run_identity(out)
        summary, _ = board.summary_block(out.read_text(errors="replace"))
        note = ""
        if identity["val_bpb"] is None:
            note = f"no val_bpb: exit {rc}"
        elif identity["seed"] != seed:
            note = (f"its summary says seed {identity['seed']}, not {seed}: train.py at {commit} ignores "
                    "AUTORESEARCH_SEED")
        val = identity["val_bpb"] if not note else None
        try:
            memory = float(summary["peak_vram_mb"]) / 1024
        except (KeyError, ValueError):
            memory = None
        row = Run(0, board.now_utc(), role, commit, seed, val, memory, identity["data"] or "-", where, note)
        board.append_line(p.file, row.to_line(), COLUMNS)
        rel = out.relative_to(p.root)
        if note:
            self.failed += 1
            warn(f"{where}: {role} {commit} seed {seed}: {note} ({rel})")
        else:
            log(f"{where}: {role} {commit} seed {seed}: val_bpb {val:.6f} ({rel})")

    def worker(self, jobs, gpu):
        """Take jobs off the shared list until none is left (or we are stopping)."""
        while not self.stopping.is_set():
            try:
                role, seed = jobs.pop(0)
            except IndexError:
                return
            try:
                self.run(role, seed, gpu)
            except (Refusal, OSError) as e:
                if not self.stopping.is_set():
                    self.failed += 1
                    warn(f"{role} seed {seed}: {e}")

    def stop_runs(self):
        """TERM every run going (its whole process group), KILL what is left after GRACE seconds."""
        self.stopping.set()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in list(self.procs.values()):
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + GRACE
            while self.procs and time.monotonic() < deadline:
                time.sleep(0.1)
        if self.plan.slurm:  # srun ends its job when it gets TERM; a job left over is cancelled by name
            try:
                subprocess.run(["scancel", f"--name=autoresearch-{self.plan.tag}-confirm"], capture_output=True,
                               timeout=30, check=False)
            except (OSError, subprocess.TimeoutExpired):
                warn(f"cancel the jobs yourself: scancel --name=autoresearch-{self.plan.tag}-confirm")

    def cleanup(self):
        self.stopping.set()
        for wt in list(self.made):
            if wt.exists():
                self.remove(wt)
        launch.git(self.plan.root, "worktree", "prune", check=False)
        try:
            self.plan.worktrees.rmdir()
        except OSError:
            pass


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def execute(plan, env):
    p = plan
    where = f"Slurm (srun {p.run_args})" if p.slurm else f"GPU(s) {' '.join(map(str, p.gpus))}"
    base, best = p.night["baseline"], p.night["best"]
    log(f"confirm {p.tag}: baseline {base.commit} ({base.val_bpb:.6f}) and best {best.commit} ({best.val_bpb:.6f}, "
        f"{best.worker}) at seeds {' '.join(map(str, p.seeds))}: {len(p.jobs)} run(s) on {where}")
    runner, threads = Runner(p, env), []
    old = {sig: signal.signal(sig, _interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if not p.jobs:
            log(f"every run is in {p.file.relative_to(p.root)} already")
            return report(p, runner)
        p.logs.mkdir(parents=True, exist_ok=True)
        p.worktrees.mkdir(parents=True)
        jobs = list(p.jobs)
        lanes = [None] * len(jobs) if p.slurm else p.gpus[:len(jobs)]
        threads = [threading.Thread(target=runner.worker, args=(jobs, gpu), daemon=True) for gpu in lanes]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.2)
    except KeyboardInterrupt:
        warn("interrupted: ending the runs, removing their worktrees")
        runner.stop_runs()
        for t in threads:
            t.join(GRACE)
        return 130
    finally:
        runner.cleanup()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return report(p, runner)


def report(p, runner):
    """The gain in one line, where the rows are, and the exit status: 1 when a run gave no number."""
    base, best = p.night["baseline"], p.night["best"]
    rel = p.file.relative_to(p.root)
    found = gain_stats(pairs(read(p.file)[0])[1])
    if found:
        spread = f" +- {found['sd']:.6f} (sd)" if found["sd"] is not None else ""
        log(f"the night's gain: {found['mean']:.6f}{spread} over {found['seeds']} seed(s), the best wins at "
            f"{found['wins']} of {found['seeds']}; the loop saw {base.val_bpb - best.val_bpb:.6f} at one seed")
    log(f"results: {rel}; the report: uv run analysis.py {rel}")
    if runner.failed:
        log(f"error: {runner.failed} run(s) gave no number: see their logs in {p.logs.relative_to(p.root)}/",
            sys.stderr)
        return 1
    return 0


def main(root, args, env):
    try:
        return execute(check(Path(root), args, env), env)
    except Refusal as e:
        log(f"error: {e}", sys.stderr)
        return 1
