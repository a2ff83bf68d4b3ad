"""
spawn.sh (and the launcher behind it, autoresearch/launch.py) against a
throwaway git repo, with a stand-in for the agent.

    uv run pytest tests/test_spawn.py -v

Each test copies spawn.sh, autoresearch/launch.py and autoresearch/board.py and
a minimal program.md into a fresh git repo under tmp_path and drives
`bash spawn.sh ...` there. AUTORESEARCH_AGENT_CMD points at a small bash
script that records what its pane sees (CUDA_VISIBLE_DEVICES, working
directory, environment, last argument = the prompt), appends a row to
results.tsv, shows a `> ` prompt and waits; other stand-ins leave files or
stubborn processes behind for stop. A stand-in `nvidia-smi` on PATH lists 8
GPUs. Every test uses its own tmux server (TMUX_SOCKET -> `tmux -L`), killed
afterwards, so the user's tmux is never touched. Needs git and tmux (the tests
fail without them; .ci/run installs tmux); no GPU. The --slurm mode is tested
against a real one-node cluster in test_slurm.py, the board in test_board.py.
"""

import contextlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers import LAUNCHER, PROMPT, REPO, SPAWN, alive, git, make_sandbox, wait_for

@pytest.fixture
def sb(tmp_path, request):
    box = make_sandbox(tmp_path, request)
    yield box
    box.close()


# =============================================================================
# launch / status / stop
# =============================================================================

@pytest.mark.slow
def test_launch_status_stop(sb):
    r = sb.spawn("launch", "night1", "alpha:0", "beta:2")
    assert r.returncode == 0, r.stderr

    # One branch per worker, from the launch commit; one worktree each, venv linked.
    assert sb.branches() == ["autoresearch/night1-gpu0", "autoresearch/night1-gpu2"]
    for gpu in (0, 2):
        assert git(sb.repo, "rev-parse", f"autoresearch/night1-gpu{gpu}") == sb.head
        wt = sb.repo / "worktrees" / f"gpu{gpu}"
        assert (wt / "program.md").exists()
        assert (wt / ".venv").is_symlink() and (wt / ".venv" / "marker").exists()
        assert git(wt, "branch", "--show-current") == f"autoresearch/night1-gpu{gpu}"

    # Each pane runs in its worktree, sees its own GPU and gets the prompt.
    for gpu in (0, 2):
        cuda, cwd, prompt = sb.report(gpu)
        assert cuda == str(gpu)
        assert Path(cwd).resolve() == (sb.repo / "worktrees" / f"gpu{gpu}").resolve()
        assert prompt == PROMPT
        # program.md's run command starts right there: an empty (not unset) prefix.
        assert (sb.out / f"run{gpu}").read_text() == "\n"

    # One session: a window of one pane per worker, and the watcher's window.
    panes = sb.tmux("list-panes", "-t", "=autoresearch-night1:workers", "-F", "#{@worker}").stdout.splitlines()
    assert sorted(panes) == ["gpu0 alpha autoresearch/night1-gpu0", "gpu2 beta autoresearch/night1-gpu2"]
    pid = sb.watcher_pid("night1")
    assert pid is not None and alive(pid)

    r = sb.spawn("status")
    assert r.returncode == 0, r.stderr
    for needle in ("autoresearch-night1", "worktrees/gpu0", "worktrees/gpu2",
                   "autoresearch/night1-gpu0", "autoresearch/night1-gpu2",
                   "worktrees/gpu0/results.tsv (1 rows)", f"watcher pid {pid}"):
        assert needle in r.stdout, (needle, r.stdout)

    r = sb.spawn("stop", "night1")
    assert r.returncode == 0, r.stderr
    assert not sb.has_session("night1")
    wait_for(lambda: not alive(pid), 5, "watcher survived stop")
    assert sb.worktrees() == []
    assert "worktrees/gpu" not in git(sb.repo, "worktree", "list")
    assert sb.branches() == ["autoresearch/night1-gpu0", "autoresearch/night1-gpu2"]
    assert (sb.repo / ".venv" / "marker").exists(), "removing a worktree must not touch the linked venv"
    for gpu in (0, 2):
        rows = (sb.repo / "results" / f"night1-gpu{gpu}.tsv").read_text().splitlines()
        assert rows == ["commit\tval_bpb\tmemory_gb\tstatus\tdescription",
                        f"abc1234\t0.997900\t44.0\tkeep\tbaseline gpu{gpu}"]

    assert "results/night1-gpu0.tsv (1 rows)" in sb.spawn("status").stdout

    # Safe to re-run.
    r = sb.spawn("stop", "night1")
    assert r.returncode == 0 and "nothing running" in r.stdout


def test_stop_never_overwrites_results(sb):
    (sb.repo / "results").mkdir()
    (sb.repo / "results" / "n2-gpu1.tsv").write_text("earlier night\n")
    assert sb.spawn("launch", "n2", "a:1").returncode == 0
    sb.report(1)
    assert sb.spawn("stop", "n2").returncode == 0
    assert (sb.repo / "results" / "n2-gpu1.tsv").read_text() == "earlier night\n"
    assert "baseline gpu1" in (sb.repo / "results" / "n2-gpu1-2.tsv").read_text()


def test_relaunch_refuses_and_changes_nothing(sb):
    assert sb.spawn("launch", "n3", "a:0").returncode == 0
    sb.report(0)

    # While it runs: same tag on another GPU is refused (session exists).
    r = sb.spawn("launch", "n3", "a:1")
    assert r.returncode == 1 and "already exists" in r.stderr
    assert sb.branches() == ["autoresearch/n3-gpu0"] and sb.worktrees() == ["gpu0"]

    # After stop: the kept branch blocks the tag; nothing is created or moved.
    assert sb.spawn("stop", "n3").returncode == 0
    git(sb.repo, "commit", "-q", "--allow-empty", "-m", "later")
    r = sb.spawn("launch", "n3", "a:0", "a:1")
    assert r.returncode == 1
    assert "autoresearch/n3-gpu0 exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sb.branches() == ["autoresearch/n3-gpu0"]
    assert git(sb.repo, "rev-parse", "autoresearch/n3-gpu0") == sb.head
    assert sb.worktrees() == [] and not sb.has_session("n3")


def test_panes_get_this_shells_environment(sb):
    """A tmux server started earlier (you launch from inside tmux) does not know
    variables exported since; launch hands them to each pane itself."""
    env = {k: v for k, v in sb.env.items() if k != "AUTORESEARCH_CACHE"}
    subprocess.run(["tmux", "-L", sb.socket, "new-session", "-d", "-s", "earlier"], env=env, check=True)
    cache = "/data/my cache's root"
    r = sb.spawn("launch", "n11", "a:0", AUTORESEARCH_CACHE=cache, AUTORESEARCH_RUN="srun --from-my-shell")
    assert r.returncode == 0, r.stderr
    sb.report(0)
    assert (sb.out / "cache0").read_text() == cache + "\n"
    # A local worker's runs stay local whatever this shell exported.
    assert (sb.out / "run0").read_text() == "\n"


def test_agent_command_lines(sb, tmp_path):
    # Fake claude/codex CLIs on PATH record how each pane started them.
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir()
    for name in ("claude", "codex"):
        tool = fake_bin / name
        tool.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" {name} "$@" > "{sb.out}/argv$CUDA_VISIBLE_DEVICES"\nsleep 600\n')
        tool.chmod(0o755)
    r = sb.spawn("launch", "n10", "claude:0", "opus:1", "codex:2", AUTORESEARCH_AGENT_CMD="",
                 CLAUDE_MODEL="haiku", PATH=f"{fake_bin}:{sb.env['PATH']}")
    assert r.returncode == 0, r.stderr
    prompt = PROMPT
    expected = {
        0: ["claude", "--dangerously-skip-permissions", "--model", "haiku", prompt],
        1: ["claude", "--dangerously-skip-permissions", "--model", "opus", prompt],
        2: ["codex", "--dangerously-bypass-approvals-and-sandbox", prompt],
    }
    for gpu, argv in expected.items():
        path = sb.out / f"argv{gpu}"
        wait_for(path.exists, 10, f"fake agent on gpu{gpu} never started")
        wait_for(lambda: path.read_text().endswith(prompt + "\n"), 5, "argv file incomplete")
        assert path.read_text().splitlines() == argv


def test_unknown_agent_leaves_nothing(sb):
    env = dict(AUTORESEARCH_AGENT_CMD="")
    r = sb.spawn("launch", "n4", "claude:0", "gpt5:1", **env)
    assert r.returncode == 1
    assert "unknown agent 'gpt5'" in r.stderr
    assert sb.branches() == [] and sb.worktrees() == [] and not sb.has_session("n4")


def test_failure_mid_launch_rolls_back(sb):
    # A post-checkout hook that fails for the second worktree makes
    # `git worktree add` fail after the first worker is already up.
    hook = sb.repo / ".git" / "hooks" / "post-checkout"
    hook.write_text('#!/bin/sh\ncase "$PWD" in */gpu5) exit 1 ;; esac\n')
    hook.chmod(0o755)
    r = sb.spawn("launch", "n5", "a:4", "a:5")
    assert r.returncode != 0
    assert "removing what it made" in r.stdout
    assert sb.branches() == [] and sb.worktrees() == [] and not sb.has_session("n5")


@pytest.mark.parametrize("args, message", [
    (["launch", "n6", "a:0", "b:0"], "GPU 0 is given twice"),
    (["launch", "n6", "a:0", "b:00"], "GPU 0 is given twice"),
    (["launch", "n6", "claude0"], "bad worker 'claude0'"),
    (["launch", "n6", "claude:x"], "bad worker 'claude:x'"),
    (["launch", "n6"], "no workers given"),
    (["launch", "bad tag", "a:0"], "invalid tag 'bad tag'"),
    (["launch", "a..b", "a:0"], "invalid tag 'a..b'"),
    (["launch", "-x", "a:0"], "invalid tag '-x'"),
    (["launch", "n6", "--slurn", "a:0"], "unknown option '--slurn'"),
    (["launch", "--slurm"], "launch needs a tag and workers"),
    (["stop"], "stop needs exactly one tag"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_bad_arguments_fail_cleanly(sb, args, message):
    r = sb.spawn(*args)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert sb.branches() == [] and sb.worktrees() == []


def test_missing_venv_is_only_a_warning(sb):
    shutil.rmtree(sb.repo / ".venv")
    r = sb.spawn("launch", "n7", "a:3")
    assert r.returncode == 0, r.stderr
    assert "warning: no .venv" in r.stderr
    assert sb.report(3)[0] == "3"
    assert not (sb.repo / "worktrees" / "gpu3" / ".venv").exists()


@pytest.mark.slow
def test_watcher_nudges_an_idle_pane(sb):
    r = sb.spawn("launch", "n8", "a:0", WATCH_INTERVAL="1")
    assert r.returncode == 0, r.stderr
    pid = sb.watcher_pid("n8")
    nudge = sb.out / "gpu0.nudge"
    # The stand-in sits at `> `: unchanged after one interval, so the watcher types.
    wait_for(nudge.exists, 15, "the idle pane was never nudged")
    assert nudge.read_text().strip() == "keep going"
    assert "nudging" in (sb.repo / "worktrees" / ".watcher-n8.log").read_text()
    assert alive(pid)
    assert sb.spawn("stop", "n8").returncode == 0
    wait_for(lambda: not alive(pid), 5, "watcher survived stop")


def test_pane_reports_when_the_agent_exits(sb, tmp_path):
    quick = tmp_path / "quick.sh"
    quick.write_text("exit 3\n")
    assert sb.spawn("launch", "n9", "a:0", AUTORESEARCH_AGENT_CMD=f"bash {quick}").returncode == 0
    screen = lambda: sb.tmux("capture-pane", "-p", "-t", "=autoresearch-n9:").stdout  # noqa: E731
    wait_for(lambda: "agent exited with status 3" in screen(), 10, "no exit note in the pane")
    # The pane stays open (a shell), and is marked so the watcher leaves it alone.
    assert sb.tmux("list-panes", "-t", "=autoresearch-n9:", "-F", "#{@autoresearch_done}").stdout.strip() == "1"


# =============================================================================
# Environment errors
# =============================================================================

def copy_launcher(folder):
    for name in LAUNCHER:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, folder / name)


def test_not_inside_a_git_repo(tmp_path):
    copy_launcher(tmp_path)
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tmp_path.parent))
    r = subprocess.run(["bash", "spawn.sh", "status"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "not inside a git repository" in r.stderr


def test_missing_tmux(tmp_path):
    # A PATH with bash, git and python3 but no tmux.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "git", "python3"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    copy_launcher(tmp_path)
    r = subprocess.run([str(bin_dir / "bash"), "spawn.sh", "status"], cwd=tmp_path,
                       env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, capture_output=True, text=True)
    assert r.returncode == 1 and "tmux not found" in r.stderr


@pytest.mark.parametrize("script, message", [
    ("exit 127", "does not run"),                # a pyenv shim with no version, a broken install
    ("echo False", "is older than 3.10"),
])
def test_a_python_that_will_not_do_is_named(tmp_path, script, message):
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!/usr/bin/env bash\n{script}\n")
    fake.chmod(0o755)
    copy_launcher(tmp_path)
    r = subprocess.run(["bash", "spawn.sh", "status"], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, AUTORESEARCH_PYTHON=str(fake)))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and message in lines[0], r.stderr


def test_help_shows_usage():
    r = subprocess.run(["bash", str(SPAWN), "help"], capture_output=True, text=True)
    assert r.returncode == 0
    assert "bash spawn.sh launch <tag> <agent:gpu>" in r.stdout and "WATCH_INTERVAL" in r.stdout


# =============================================================================
# Launcher checks (issue 15): nothing is created for a launch that cannot work
# =============================================================================

def assert_nothing_made(sb, tag):
    assert sb.branches() == [] and sb.worktrees() == [] and not sb.has_session(tag)
    assert not list((sb.repo / "worktrees").glob(f".*-{tag}*")) if (sb.repo / "worktrees").exists() else True


@pytest.mark.parametrize("agent_cmd, worker, program", [
    ("", "claude:0", "claude"),
    ("", "codex:1", "codex"),
    ("MODE=night no-such-agent-cli --flag", "x:0", "no-such-agent-cli"),
])
def test_missing_agent_program_is_refused(sb, agent_cmd, worker, program):
    # Before: launch exited 0 and only the pane said 'command not found'.
    r = sb.spawn("launch", "n12", worker, AUTORESEARCH_AGENT_CMD=agent_cmd)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"agent program '{program}' not found" in lines[0], r.stderr
    assert_nothing_made(sb, "n12")


@pytest.mark.parametrize("n_gpus, workers, message", [
    (None, ["a:5"], "no GPU: nvidia-smi not found"),        # before: a warning, and GPU 5 bound anyway
    (0, ["a:0", "a:1"], "no GPU: nvidia-smi lists none"),
    ("fail", ["a:0"], "no GPU: nvidia-smi -L failed"),
    (None, [f"a:{i}" for i in range(64)], "no GPU: nvidia-smi not found"),
])
def test_no_gpu_is_refused(sb, n_gpus, workers, message):
    if n_gpus == "fail":
        (sb.bin / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    else:
        sb.fake_nvidia_smi(n_gpus)
    r = sb.spawn("launch", "n13", *workers)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "--slurm" in lines[0], r.stderr
    assert_nothing_made(sb, "n13")


@pytest.mark.parametrize("worker, message", [
    ("a:2", "no GPU 2: nvidia-smi lists 2 GPU(s)"),
    ("a:18446744073709551616", "index 18446744073709551616 is out of range"),  # wrapped to GPU 0 before
    ("a:99999999999999999999", "index 99999999999999999999 is out of range"),
])
def test_gpu_indices_beyond_the_machine_are_refused(sb, worker, message):
    sb.fake_nvidia_smi(2)
    r = sb.spawn("launch", "n14", "a:1", worker)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert_nothing_made(sb, "n14")


def test_leading_zeros_name_the_same_gpu(sb):
    sb.fake_nvidia_smi(2)
    assert sb.spawn("launch", "n15", "a:0001").returncode == 0
    assert sb.report(1)[0] == "1" and sb.worktrees() == ["gpu1"]


def test_stop_cleans_up_after_an_agent_switched_branch(sb):
    assert sb.spawn("launch", "n16", "a:0").returncode == 0
    sb.report(0)
    wt = sb.repo / "worktrees" / "gpu0"
    git(wt, "checkout", "-q", "-b", "side-quest")
    r = sb.spawn("stop", "n16")
    assert r.returncode == 0, r.stderr
    assert sb.worktrees() == [] and "worktrees/gpu0" not in git(sb.repo, "worktree", "list")
    assert "baseline gpu0" in (sb.repo / "results" / "n16-gpu0.tsv").read_text()
    assert "autoresearch/n16-gpu0" in sb.branches() and "side-quest" in git(sb.repo, "branch")
    # Before: the leftover worktree refused every later launch on this GPU.
    assert sb.spawn("launch", "n16b", "a:0").returncode == 0


def test_stop_cleans_up_a_worktree_without_git(sb):
    assert sb.spawn("launch", "n17", "a:0", "a:1").returncode == 0
    sb.report(0)
    sb.report(1)
    (sb.repo / "worktrees" / "gpu0" / ".git").unlink()
    for _ in range(2):  # before: exit 128 on every run
        r = sb.spawn("stop", "n17")
        assert r.returncode == 0, r.stderr
    assert sb.worktrees() == [] and "worktrees/gpu" not in git(sb.repo, "worktree", "list")
    for gpu in (0, 1):
        assert "baseline" in (sb.repo / "results" / f"n17-gpu{gpu}.tsv").read_text()
    assert sb.branches() == ["autoresearch/n17-gpu0", "autoresearch/n17-gpu1"]


def test_stop_leaves_another_tags_worktree_alone(sb):
    # n18's worktree deleted by hand, then n19 launched on the same GPU: n18's
    # record still names worktrees/gpu0, which is n19's now.
    assert sb.spawn("launch", "n18", "a:0").returncode == 0
    sb.report(0)
    sb.tmux("kill-session", "-t", "=autoresearch-n18")
    shutil.rmtree(sb.repo / "worktrees" / "gpu0")
    git(sb.repo, "worktree", "prune")
    (sb.out / "gpu0.txt").unlink()
    assert sb.spawn("launch", "n19", "a:0").returncode == 0
    sb.report(0)
    r = sb.spawn("stop", "n18")
    assert r.returncode == 0 and "now belongs to autoresearch/n19-gpu0" in r.stderr
    assert sb.worktrees() == ["gpu0"] and sb.has_session("n19")


def test_no_arguments_is_a_usage_error(sb):
    r = sb.spawn()
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no command given" in lines[0]
    assert sb.spawn("help").returncode == 0


def test_status_says_none(sb):
    r = sb.spawn("status")
    assert r.returncode == 0, r.stderr
    headings = ("tmux sessions:", "worktrees:", "research branches:", "results files:")
    lines = r.stdout.splitlines()
    for heading in headings:
        i = next(i for i, line in enumerate(lines) if line.endswith(heading))
        assert lines[i + 1] == "  none", r.stdout


def test_readme_gives_one_agent_the_prompt_launch_gives(sb):
    """One first prompt, whether the agent is started by hand or by launch."""
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", readme, re.M | re.S)
    prompts = [b.strip() for b in blocks if b.startswith("Read program.md")]
    assert prompts == [PROMPT], prompts
    assert sb.spawn("launch", "n20", "a:0").returncode == 0
    assert sb.report(0)[2] == PROMPT


# =============================================================================
# The launcher in Python (issue 21) and round three of faults (issue 22)
# =============================================================================

def running(pid):
    """Alive and not a zombie (a killed child that nobody reaped yet is gone for our purposes)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in "ZX"


def test_the_watcher_is_a_window_of_the_session(sb):
    assert sb.spawn("launch", "n30", "a:0").returncode == 0
    pid = sb.watcher_pid("n30")
    assert pid is not None and running(pid)
    windows = sb.tmux("list-windows", "-t", "=autoresearch-n30", "-F", "#{window_name} #{window_active}").stdout
    assert windows.split("\n")[:2] == ["workers 1", "watcher 0"]   # the panes show; the watcher is aside
    # Before: a nohup'ed process that outlived the session by up to WATCH_INTERVAL.
    sb.tmux("kill-session", "-t", "=autoresearch-n30")
    wait_for(lambda: not running(pid), 5, "the watcher outlived its session")


HOARDER = r"""#!/usr/bin/env bash
# Stand-in agent that leaves things in its worktree: notes, a plot, a log, caches, an uncommitted edit.
out=$1
printf 'commit\tval_bpb\tmemory_gb\tstatus\tdescription\n' > results.tsv
printf 'what I learnt\n' > notes.md
mkdir -p plots/night __pycache__
printf 'PNG' > plots/night/progress.png
printf 'log\n' > run.log
printf 'cache' > __pycache__/train.cpython-311.pyc
printf 'edited, never committed\n' >> program.md
touch "$out/ready"
sleep 600
"""


@contextlib.contextmanager
def one_worker(tmp_path, request, script, tag):
    """A sandbox whose one stand-in agent (<script>, on GPU 0) has launched and touched OUT/ready."""
    sb = make_sandbox(tmp_path, request, agent_script=script)
    try:
        assert sb.spawn("launch", tag, "a:0").returncode == 0
        wait_for((sb.out / "ready").exists, 10, "the stand-in never got ready")
        yield sb
    finally:
        sb.close()


def test_stop_keeps_a_workers_untracked_files(tmp_path, request):
    with one_worker(tmp_path, request, HOARDER, "n31") as sb:
        r = sb.spawn("stop", "n31")
        assert r.returncode == 0, r.stderr
        kept = sb.repo / "results" / "n31-gpu0"
        assert (kept / "notes.md").read_text() == "what I learnt\n"    # before: deleted without a word
        assert (kept / "plots" / "night" / "progress.png").read_text() == "PNG"
        assert (kept / "run.log").is_file() and (sb.repo / "results" / "n31-gpu0.tsv").is_file()
        assert "+edited, never committed" in (kept / "uncommitted.diff").read_text()
        assert not (kept / "__pycache__").exists() and not (kept / ".venv").exists()
        assert (sb.repo / ".venv" / "marker").exists()
        assert "kept in results/n31-gpu0/: 3 untracked file(s)" in r.stdout and "uncommitted.diff" in r.stdout
        assert sb.worktrees() == []


STUBBORN = r"""#!/usr/bin/env bash
# Stand-in agent whose processes survive a closed terminal: a run in its own process group (program.md's
# timeout), one in its own session, one that ignores HUP and TERM; and the agent ignores HUP itself.
out=$1
trap '' HUP
timeout 600 sleep 600 &
echo $! > "$out/timeout.pid"
setsid bash -c 'echo $$ > "$1/setsid.pid"; exec sleep 600' _ "$out" &
( trap '' HUP TERM; exec sleep 600 ) &
echo $! > "$out/stubborn.pid"
echo $$ > "$out/agent.pid"
sleep 1
touch "$out/ready"
sleep 600
"""


@pytest.mark.slow
def test_stop_ends_every_process_the_night_started(tmp_path, request):
    with one_worker(tmp_path, request, STUBBORN, "n32") as sb:
        pids = {name: int((sb.out / f"{name}.pid").read_text()) for name in ("timeout", "setsid", "stubborn", "agent")}
        assert all(running(pid) for pid in pids.values())
        r = sb.spawn("stop", "n32", STOP_GRACE="1")
        assert r.returncode == 0, r.stderr
        # Before: each of them ran on after stop, into a deleted worktree.
        wait_for(lambda: not any(running(pid) for pid in pids.values()), 5,
                 f"still running: {[n for n, p in pids.items() if running(p)]}\n{r.stdout}")
        ended = next(line for line in r.stdout.splitlines() if "ended" in line and "process(es)" in line)
        assert f"{pids['timeout']} timeout" in ended and f"{pids['agent']} bash" in ended
        assert "ignored TERM for 1 s and got KILL" in ended and f"{pids['stubborn']} sleep" in ended.split("KILL")[1]


def fake_tool(sb, name, body):
    tool = sb.bin / name
    tool.write_text(f"#!/usr/bin/env bash\n{body}\n")
    tool.chmod(0o755)


@pytest.mark.slow
def test_status_and_stop_do_not_wait_on_an_unanswering_squeue(sb):
    fake_tool(sb, "squeue", "exec sleep 30")   # a Slurm client with no controller behind it
    fake_tool(sb, "scancel", "exec sleep 30")
    assert sb.spawn("launch", "n33", "a:0").returncode == 0
    for args in (["status"], ["stop", "n33"]):
        start = time.monotonic()
        r = sb.spawn(*args)
        assert r.returncode == 0 and time.monotonic() - start < 5, (args, r.stdout, r.stderr)
        assert "Slurm" not in r.stdout + r.stderr            # a local launch never asks Slurm
    # A Slurm launch asks, once, and gives up after SLURM_TIMEOUT with one line.
    fake_tool(sb, "srun", "exec sleep 600")
    assert sb.spawn("launch", "n34", "--slurm", "a:0").returncode == 0
    start = time.monotonic()
    r = sb.spawn("status", SLURM_TIMEOUT="1")
    assert r.returncode == 0 and "unavailable (squeue -h -u did not answer within 1 s)" in r.stdout
    r = sb.spawn("stop", "n34", SLURM_TIMEOUT="1")
    assert r.returncode == 0 and time.monotonic() - start < 8
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not answer within 1 s" in lines[0] and "scancel --name=autoresearch-n34-" in lines[0]
    assert sb.worktrees() == []


def test_launch_from_another_repository_is_refused(sb, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q", "-b", "main")
    (other / "README").write_text("another project\n")
    git(other, "add", "-A")
    git(other, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "init")
    r = subprocess.run(["bash", str(sb.repo / "spawn.sh"), "launch", "n35", "a:0"], cwd=other, env=sb.env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "another git repository" in lines[0] and str(sb.repo) in lines[0], r.stderr
    assert git(other, "branch", "--list", "autoresearch/*") == "" and not (other / "worktrees").exists()
    assert_nothing_made(sb, "n35")
    # Outside any repository, spawn.sh works on its own.
    outside = tmp_path / "outside"
    outside.mkdir()
    env = dict(sb.env, GIT_CEILING_DIRECTORIES=str(tmp_path))
    r = subprocess.run(["bash", str(sb.repo / "spawn.sh"), "status"], cwd=outside, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "research branches:" in r.stdout


@pytest.mark.parametrize("setup, env, tag, message", [
    ("worktrees", {}, "n36", "worktrees is a file, not a folder"),
    ("results", {}, "n36", "results is a file, not a folder"),
    (None, {}, "t" * 250, "250 characters, at most 64"),
    (None, {"AUTORESEARCH_CACHE": "data/cache"}, "n36", "AUTORESEARCH_CACHE='data/cache' is relative"),
    (None, {"WATCH_INTERVAL": "0"}, "n36", "WATCH_INTERVAL='0' is not a number of seconds >= 1"),
    (None, {"WATCH_INTERVAL": "soon"}, "n36", "WATCH_INTERVAL='soon' is not a number"),
    (None, {"WATCH_INTERVAL": "nan"}, "n36", "WATCH_INTERVAL='nan' is not a number"),
    (None, {"IDLE_LINES": "0"}, "n36", "IDLE_LINES='0' is not a count"),
    (None, {"IDLE_PROMPT_REGEX": "(>"}, "n36", "IDLE_PROMPT_REGEX is not a regular expression"),
    (None, {"NUDGE_MESSAGE": " "}, "n36", "NUDGE_MESSAGE is empty"),
])
def test_launcher_inputs_are_checked_before_anything_is_made(sb, setup, env, tag, message):
    if setup:
        (sb.repo / setup).write_text("a file in the way\n")
    r = sb.spawn("launch", tag, "a:0", "a:1", **env)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert sb.branches() == [] and not sb.tmux("list-sessions").stdout
    if setup:
        assert (sb.repo / setup).read_text() == "a file in the way\n"
    else:
        assert not (sb.repo / "worktrees").exists() and not (sb.repo / "results").exists()


@pytest.mark.slow
def test_posix_classes_in_the_idle_regex_still_work(sb):
    r = sb.spawn("launch", "n37", "a:0", WATCH_INTERVAL="1",
                 IDLE_PROMPT_REGEX="^[[:space:]]*(│[[:space:]]*)?(>|›|❯)([[:space:]].*)?$")
    assert r.returncode == 0, r.stderr
    wait_for((sb.out / "gpu0.nudge").exists, 15, "the idle pane was never nudged")


def test_a_second_night_on_one_board_tag_is_refused(sb):
    (sb.repo / "results").mkdir()
    (sb.repo / "results" / "n38-board.tsv").write_text("a past night's board\n")
    r = sb.spawn("launch", "n38", "a:0")
    assert r.returncode == 1 and "results/n38-board.tsv exists" in r.stderr
    assert_nothing_made(sb, "n38")


def test_help_gives_program_mds_run_command():
    help_text = subprocess.run(["bash", str(SPAWN), "help"], capture_output=True, text=True).stdout
    run = "$AUTORESEARCH_RUN timeout 600 uv run train.py > run.log 2>&1"
    assert run in help_text and run in (REPO / "program.md").read_text()
    assert "results/<tag>-gpu<N>/" in help_text and "STOP_GRACE" in help_text


def test_panes_know_their_night(sb):
    assert sb.spawn("launch", "n39", "a:4").returncode == 0
    sb.report(4)
    env = dict(item.split("=", 1) for item in (sb.out / "env4").read_text().split("\0") if "=" in item)
    assert env["AUTORESEARCH_TAG"] == "n39" and env["AUTORESEARCH_WORKER"] == "gpu4"
    assert env["AUTORESEARCH_BOARD"] == str((sb.repo / "results" / "n39-board.tsv").resolve())
    assert (sb.repo / "results" / "n39-board.tsv").read_text().startswith("time\tworker\tcommit")
    assert "CLAUDE_FLAGS" not in env and "WATCH_INTERVAL" not in env   # spawn.sh's settings stay its own
