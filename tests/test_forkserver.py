"""
The fork server (autoresearch/forkserver.py): a run handed to it goes on in a fork with
its own arguments, folder, environment, streams and project files, ends with the same
status a cold run would, takes signals, dies with its process, and a server serves only
the environment it was started for. Servers here import `json` only (tiny), in a
temporary folder, and are stopped at the end of each test.
"""

import contextlib
import importlib.util
import os
import shutil
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

from pathlib import Path

import pytest

from helpers import ROOT
from autoresearch import forkserver

SCRIPT = """\
if __name__ == "__main__":
    from autoresearch import forkserver
    forkserver.hand_off(__file__)
import os, sys, time
import mod
from autoresearch import forkserver
print("run", os.getcwd(), sys.argv, os.environ.get("X"), mod.VALUE, forkserver.__file__, flush=True)
what = os.environ.get("DO", "")
if what == "stdin":
    print("stdin", repr(sys.stdin.read()), flush=True)
if what == "fail":
    raise ValueError("a bad edit")
if what == "message":
    raise SystemExit("FAIL: one line")
if what == "term":
    os.kill(os.getpid(), 15)
if what == "kill":
    os.kill(os.getpid(), 9)
if what == "streams":
    print("streams", sys.stdout.write_through, sys.stdout.encoding, __file__, sys.flags.optimize, flush=True)
if what == "live":
    from autoresearch import live, manifest
    live.check_live({name: sha[:12] for name, sha in manifest.harness_fingerprints().items() if sha})
    print("live ok", flush=True)
if what == "wait":
    open("run.pid", "w").write(str(os.getpid()))
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(7)
print("to stderr", file=sys.stderr)
sys.exit(int(os.environ.get("CODE", "0")))
"""


@pytest.fixture
def project(tmp_path):
    """A folder with the package, a module of its own and the script; its runs' environment."""
    def make(name, value):
        where = tmp_path / name
        shutil.copytree(ROOT / "autoresearch", where / "autoresearch", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "constants.py", where)
        (where / "mod.py").write_text(f"VALUE = {value!r}\n")
        (where / "s.py").write_text(SCRIPT)
        return where
    tmp = tempfile.mkdtemp(prefix="fs", dir="/tmp")  # short: a socket's path holds 108 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "PYTHON"))}
    env.update(TMPDIR=tmp, AUTORESEARCH_FORKSERVER="1", AUTORESEARCH_FORKSERVER_IMPORTS="json",
               AUTORESEARCH_FORKSERVER_IDLE="1")
    yield make, env
    for pid in servers(tmp):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(tmp, ignore_errors=True)


def servers(tmp):
    """Pids of the servers whose sockets live under tmp."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                mine = f"TMPDIR={tmp}".encode() in f.read().split(b"\0")
        except OSError:
            continue
        if mine and b"autoresearch.forkserver" in cmd:
            pids.append(int(pid))
    return pids


def run(where, env, *args, stdin="", **extra):
    return subprocess.run([sys.executable, "s.py", *args], cwd=where, env={**env, **extra}, input=stdin,
                          capture_output=True, text=True, timeout=60)


def up(env, timeout=30):
    """Wait for a server's socket under env's TMPDIR; its path."""
    folder = os.path.join(env["TMPDIR"], f"autoresearch-forkserver-{os.getuid()}")
    deadline = time.time() + timeout
    while time.time() < deadline:
        socks = [n for n in os.listdir(folder) if n.endswith(".sock")] if os.path.isdir(folder) else []
        if socks:
            return os.path.join(folder, socks[0])
        time.sleep(0.05)
    logs = [open(os.path.join(folder, n)).read() for n in os.listdir(folder) if n.endswith(".log")]
    raise AssertionError(f"no server came up; its logs: {logs}")


def test_a_run_goes_on_in_a_fork_with_its_arguments_folder_environment_and_streams(project):
    make, env = project
    where = make("a", "first")
    cold = run(where, env, "one", X="1")
    assert cold.returncode == 0, cold.stderr
    assert cold.stdout.startswith("imports:     cold; started a fork server (pid ")
    up(env)
    forked = run(where, env, "two", "--flag", X="2", DO="stdin", CODE="3", stdin="some input\n")
    assert forked.returncode == 3, forked.stderr
    first, second, third = forked.stdout.splitlines()[:3]
    assert first.startswith("imports:     forked from the fork server (pid ")
    assert second == f"run {where} ['s.py', 'two', '--flag'] 2 first {where / 'autoresearch' / 'forkserver.py'}"
    assert third == "stdin 'some input\\n'"
    assert forked.stderr == "to stderr\n"


def test_a_forked_run_ends_as_a_cold_one_would(project):
    make, env = project
    where = make("a", 1)
    run(where, env)
    up(env)
    failed = run(where, env, DO="fail")
    assert failed.returncode == 1 and failed.stderr.splitlines()[-1] == "ValueError: a bad edit"
    assert "Traceback" in failed.stderr and "forkserver.py" not in failed.stderr  # the run's frames only
    assert run(where, env, CODE="-1").returncode == 255  # as a process's exit makes sys.exit(-1)
    message = run(where, env, DO="message")
    assert message.returncode == 1 and message.stderr == "FAIL: one line\n"
    killed = run(where, env, DO="term")
    assert killed.returncode == -signal.SIGTERM  # the waiting process dies of the same signal
    oom = run(where, env, DO="kill")  # as the out-of-memory killer would
    assert oom.returncode == -signal.SIGKILL and oom.stderr == ""
    live = run(where, env, DO="live")  # the fixed files' check at the summary: the fork changed none of them
    assert live.returncode == 0 and "live ok" in live.stdout, live.stderr
    assert all("forked from" in r.stdout for r in (failed, message, killed, oom, live))


def own_group(ignore_hup=False):
    """For Popen: a process group of its own in pytest's session, where Ctrl-Z stops a process even
    when pytest's own group is orphaned (started in the background by a shell that has exited: the
    kernel then discards SIGTSTP)."""
    def setup():
        os.setpgrp()
        for signum in (signal.SIGINT, signal.SIGQUIT):  # ignored under `pytest &` in a script: not here
            signal.signal(signum, signal.SIG_DFL)
        if ignore_hup:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return setup


def handing_off(pid):
    """Whether the process has its hand-off handlers (SIGTSTP caught, which only run_forked does)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
    except OSError:  # gone
        return False
    return bool(caught & 1 << (signal.SIGTSTP - 1))


def waiting_run(where, env, ignore_hup=False):
    """A forked run that waits (DO=wait), started: (its waiting process, the run's pid)."""
    pidfile = where / "run.pid"
    pidfile.unlink(missing_ok=True)
    waiting = subprocess.Popen([sys.executable, "s.py"], cwd=where, env={**env, "DO": "wait"},
                               stdout=subprocess.PIPE, text=True, preexec_fn=own_group(ignore_hup))
    deadline = time.time() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.time() < deadline, "the run never started"
        time.sleep(0.05)
    forked = int(pidfile.read_text())
    assert forked != waiting.pid
    return waiting, forked


def state(pid):
    """The process's state letter, or None once it is gone (reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def wait_until(condition, what, timeout=10):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.05)


def test_signals_reach_the_run_and_the_run_dies_with_its_process(project):
    make, env = project
    where = make("a", 1)
    run(where, env)
    up(env)
    for signum, expected in ((signal.SIGINT, 7), (signal.SIGKILL, -signal.SIGKILL)):
        waiting, forked = waiting_run(where, env)
        waiting.send_signal(signum)
        assert waiting.wait(timeout=30) == expected
        if signum == signal.SIGINT:
            assert "interrupted" in waiting.stdout.read()
        wait_until(lambda: state(forked) in (None, "Z"), f"the forked run {forked} outlived its process")
        waiting.stdout.close()
    # Ctrl-Z stops the run with its waiting process; killed while stopped, the run goes with it
    waiting, forked = waiting_run(where, env)
    waiting.send_signal(signal.SIGTSTP)
    wait_until(lambda: state(forked) == "T" and state(waiting.pid) == "T", "Ctrl-Z did not stop the run")
    waiting.kill()
    assert waiting.wait(timeout=30) == -signal.SIGKILL
    wait_until(lambda: state(forked) in (None, "Z"), "a stopped run outlived its process")
    waiting.stdout.close()


@contextlib.contextmanager
def stand_in_server(where, env):
    """The socket of a killed real server, now held by the test. Yields the waiting process of a run
    sent to it, the accepted connection (its request and streams read; the answer is the test's to
    give) and a `sleep` that stands in for the forked run."""
    run(where, env)
    path = up(env)
    for pid in servers(env["TMPDIR"]):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not servers(env["TMPDIR"]), "the server outlived SIGKILL")
    os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(30)
        target = subprocess.Popen(["sleep", "60"])
        waiting = subprocess.Popen([sys.executable, "s.py"], cwd=where, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, preexec_fn=own_group())
        try:
            conn, _ = listener.accept()
            _, fds, _, _ = socket.recv_fds(conn, 4, 3)
            for fd in fds:
                os.close(fd)
            yield waiting, conn, target
        finally:
            for process in (waiting, target):
                process.kill()
                process.wait()
            waiting.stdout.close()
            waiting.stderr.close()


def running(*pids):
    return all(state(pid) not in ("T", None) for pid in pids)


def test_ctrl_z_before_the_runs_pid_waits_for_it(project):
    """Ctrl-Z may come between the request and the server's answer (a stand-in server answers late
    here): it stops neither process until the run's pid is known, then both, once however often it
    was pressed; SIGCONT resumes both. Ctrl-Z undone by SIGCONT before the pid stops nothing."""
    make, env = project
    where = make("a", 1)
    with stand_in_server(where, env) as (waiting, conn, target):
        for _ in range(2):
            waiting.send_signal(signal.SIGTSTP)
            time.sleep(0.3)  # each taken on its own (two pending at once are one)
        assert running(waiting.pid, target.pid)
        forkserver.send_message(conn, {"pid": target.pid})
        wait_until(lambda: state(target.pid) == "T" and state(waiting.pid) == "T", "Ctrl-Z was lost")
        waiting.send_signal(signal.SIGCONT)
        wait_until(lambda: running(waiting.pid, target.pid), "SIGCONT was lost")
        time.sleep(0.5)
        assert running(waiting.pid, target.pid), "stopped twice"
        forkserver.send_message(conn, {"status": 3})
        assert waiting.wait(timeout=30) == 3
    with stand_in_server(where, env) as (waiting, conn, target):
        waiting.send_signal(signal.SIGTSTP)
        time.sleep(0.3)  # taken (SIGCONT discards a stop signal still pending)
        waiting.send_signal(signal.SIGCONT)
        time.sleep(0.3)
        forkserver.send_message(conn, {"pid": target.pid})
        time.sleep(0.5)
        assert running(waiting.pid, target.pid)
        forkserver.send_message(conn, {"status": 0})
        assert waiting.wait(timeout=30) == 0


def test_a_signal_that_ends_the_run_before_its_pid_ends_the_hand_off(project):
    """SIGTERM or Ctrl-C while the server has not answered: the waiting process dies of it at once, and
    closes the connection (a real server kills the run it forks for a closed one). Two at once: it
    dies of one of them, not of an error."""
    make, env = project
    where = make("a", 1)
    for signals in ([signal.SIGTERM], [signal.SIGINT], [signal.SIGINT, signal.SIGTERM]):
        with stand_in_server(where, env) as (waiting, conn, _):
            if len(signals) > 1:
                waiting.send_signal(signal.SIGSTOP)  # both pending when it goes on
                wait_until(lambda: state(waiting.pid) == "T", "SIGSTOP did not stop it")
            for signum in signals:
                waiting.send_signal(signum)
            waiting.send_signal(signal.SIGCONT)
            assert -waiting.wait(timeout=10) in signals
            if signal.SIGINT in signals:  # one KeyboardInterrupt, as a cold run's
                assert waiting.stderr.read().splitlines().count("KeyboardInterrupt") == 1
            conn.settimeout(10)
            while conn.recv(1 << 16):  # the rest of the request, then the end
                pass


def test_a_run_signalled_during_the_hand_off_does_not_outlive_it(project):
    """The real server, stopped while a run is handed to it, then continued: SIGTERM or Ctrl-C sent
    meanwhile ends the waiting process by that signal, and the run the server then forks is gone."""
    make, env = project
    where = make("a", 1)
    run(where, env)
    up(env)
    server, = servers(env["TMPDIR"])
    for signum in (signal.SIGTERM, signal.SIGINT):
        os.kill(server, signal.SIGSTOP)
        waiting = subprocess.Popen([sys.executable, "s.py"], cwd=where, env={**env, "DO": "wait"},
                                   stdout=subprocess.PIPE, text=True, preexec_fn=own_group())
        try:
            wait_until(lambda: handing_off(waiting.pid), "the run was not handed off")
            time.sleep(0.2)  # it has connected and sent the run: the socket's backlog holds it
            waiting.send_signal(signum)
            assert waiting.wait(timeout=10) == -signum
        finally:
            os.kill(server, signal.SIGCONT)
            waiting.kill()
            waiting.wait()
            waiting.stdout.close()
        wait_until(lambda: servers(env["TMPDIR"]) == [server], "a run outlived its waiting process")


def test_a_run_outlives_its_server_and_still_ends_with_its_status(project):
    make, env = project
    where = make("a", 1)
    run(where, env)
    up(env)
    for signum in (signal.SIGTERM, signal.SIGKILL):  # spawn.sh stop's TERM: it finishes the runs in flight
        waiting, forked = waiting_run(where, env)
        server = [pid for pid in servers(env["TMPDIR"]) if pid != forked]
        assert len(server) == 1
        os.kill(server[0], signum)
        time.sleep(0.3)
        waiting.send_signal(signal.SIGINT)
        assert waiting.wait(timeout=30) == 7, signum  # from the server, or the run's own word after a KILL
        assert "interrupted" in waiting.stdout.read()
        waiting.stdout.close()
        wait_until(lambda: not servers(env["TMPDIR"]), "the server stayed after its runs")
        run(where, env)  # a new one, for the next case
        up(env)


def test_each_run_imports_the_project_from_its_own_folder(project):
    make, env = project
    a, b = make("a", "from a"), make("b", "from b")
    run(a, env)
    up(env)
    for where, value in ((b, "from b"), (a, "from a")):
        result = run(where, env)
        assert "forked from" in result.stdout, result.stdout
        assert f"run {where} ['s.py'] None {value} {where / 'autoresearch' / 'forkserver.py'}" in result.stdout


def test_a_server_serves_only_the_environment_it_was_started_for(project):
    make, env = project
    where = make("a", 1)
    run(where, env)
    first = up(env)
    assert "forked from" in run(where, env, AUTORESEARCH_SEED="7").stdout  # read by the run: same server
    other = run(where, env, TORCH_SOMETHING="1")  # a library may read it at import: not this server
    assert "cold; started a fork server" in other.stdout
    night = run(where, env, AUTORESEARCH_LAUNCH="night-2")  # another night's runs: its own server, its own stop
    assert "cold; started a fork server" in night.stdout
    off = run(where, env, AUTORESEARCH_FORKSERVER="0")
    assert off.returncode == 0 and not off.stdout.startswith("imports:")
    assert os.path.exists(first)


def test_a_server_that_would_fork_unsafely_refuses_and_runs_stay_cold(project):
    make, env = project
    where = make("a", 1)
    (where / "threaded.py").write_text("import threading, time\n"
                                       "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    env = {**env, "AUTORESEARCH_FORKSERVER_IMPORTS": "json,threaded", "PYTHONPATH": str(where)}
    assert "started a fork server" in run(where, env).stdout
    folder = Path(env["TMPDIR"], f"autoresearch-forkserver-{os.getuid()}")
    deadline = time.time() + 30
    while not list(folder.glob("*.refused")):
        assert time.time() < deadline, [p.read_text() for p in folder.iterdir()]
        time.sleep(0.05)
    later = run(where, env)
    assert later.returncode == 0
    assert later.stdout.startswith("imports:     cold (the fork server refused this environment: "
                                   "2 Python threads after the imports; delete ")


def test_a_server_leaves_when_idle_or_when_its_socket_goes(project):
    make, env = project
    where = make("a", 1)
    run(where, env, AUTORESEARCH_FORKSERVER_IDLE="0.02")  # 1.2 s
    up(env)
    deadline = time.time() + 30
    while servers(env["TMPDIR"]):
        assert time.time() < deadline, "an idle server stayed"
        time.sleep(0.1)
    run(where, env)
    os.unlink(up(env))
    deadline = time.time() + 30
    while servers(env["TMPDIR"]):
        assert time.time() < deadline, "a server whose socket was removed stayed"
        time.sleep(0.1)


def test_unset_it_is_on_only_with_an_nvidia_device_outside_smoke_runs_and_slurm(monkeypatch):
    for name in ("AUTORESEARCH_FORKSERVER", "AUTORESEARCH_SMOKE", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os.path, "exists", lambda path: path == "/dev/nvidiactl")
    assert forkserver.setting() is sys.platform.startswith("linux")
    monkeypatch.setenv("AUTORESEARCH_SMOKE", "1")
    assert forkserver.setting() is False
    monkeypatch.delenv("AUTORESEARCH_SMOKE")
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    assert forkserver.setting() is False
    monkeypatch.setenv("AUTORESEARCH_FORKSERVER", "1")
    assert forkserver.setting() is True
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("AUTORESEARCH_FORKSERVER")
    assert forkserver.setting() is False


@pytest.mark.slow
def test_a_forked_run_of_train_py_gives_the_cold_runs_number(prepared_cache):
    """train.py itself, forked (a smoke run, the server forced on, importing its whole list: torch,
    dynamo, inductor, FA4 where installed): it passes the live check and its summary holds the cold
    run's val_bpb from the same initial weights."""
    tmp = tempfile.mkdtemp(prefix="fs", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(AUTORESEARCH_SMOKE="1", AUTORESEARCH_CACHE=str(prepared_cache), TMPDIR=tmp,
               AUTORESEARCH_FORKSERVER="1")
    try:
        runs = []
        for _ in range(2):
            runs.append(subprocess.run([sys.executable, "train.py"], cwd=ROOT, env=env, capture_output=True,
                                       text=True, timeout=600))
            up(env, timeout=120)
        assert [r.returncode for r in runs] == [0, 0], [r.stderr[-2000:] for r in runs]
        assert runs[0].stdout.startswith("imports:     cold; started a fork server")
        assert runs[1].stdout.startswith("imports:     forked from the fork server")
        if forkserver.gpu_arch() and importlib.util.find_spec("flash_attn"):
            # FA4's import started no driver in the server (QUACK_ARCH answered quack), nor failed there
            assert "not flash_attn" not in runs[1].stdout.splitlines()[0]
            log = "".join(p.read_text() for p in Path(tmp).glob("autoresearch-forkserver-*/*.log"))
            assert "serving " in log and "; not:" not in log, log
        summaries = [dict(line.split(":", 1) for line in r.stdout.split("\n---\n")[1].splitlines() if ":" in line)
                     for r in runs]
        assert summaries[0]["init"] == summaries[1]["init"]
        assert summaries[0]["val_bpb"] == summaries[1]["val_bpb"]
    finally:
        for pid in servers(tmp):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_run_keeps_its_ignored_signals_its_stream_settings_and_its_interpreter_flags(project):
    make, env = project
    where = make("a", 1)
    run(where, env)
    up(env)
    nohup, forked = waiting_run(where, env, ignore_hup=True)
    nohup.send_signal(signal.SIGHUP)  # ignored, as under nohup, by the waiting process
    os.kill(forked, signal.SIGHUP)  # and by the run itself
    time.sleep(0.5)
    assert state(forked) not in (None, "Z")
    nohup.send_signal(signal.SIGINT)
    assert nohup.wait(timeout=30) == 7 and "interrupted" in nohup.stdout.read()
    nohup.stdout.close()
    unbuffered = subprocess.run([sys.executable, "-u", "s.py"], cwd=where, env={**env, "DO": "streams"},
                                capture_output=True, text=True, timeout=60)
    assert "forked from" in unbuffered.stdout
    assert f"streams True utf-8 {where / 's.py'} 0" in unbuffered.stdout  # -u; __file__ absolute, as Python's
    for _ in range(2):  # -O is in the key: its own server, started with -O
        optimized = subprocess.run([sys.executable, "-O", "s.py"], cwd=where, env={**env, "DO": "streams"},
                                   capture_output=True, text=True, timeout=60)
        if "forked from" in optimized.stdout:
            break
        up(env)
        time.sleep(1)
    assert "forked from" in optimized.stdout and f"streams False utf-8 {where / 's.py'} 1" in optimized.stdout


def test_a_closed_standard_stream_runs_cold(project):
    make, env = project
    where = make("a", 1)
    run(where, env)
    up(env)
    closed = subprocess.run(["bash", "-c", f"{sys.executable} s.py <&-"], cwd=where, env=env, capture_output=True,
                            text=True, timeout=60)
    assert closed.returncode == 0
    assert closed.stdout.startswith("imports:     cold (a standard stream is closed")


def test_a_bad_request_leaves_nothing_open_and_the_server_serving(project):
    make, env = project
    where = make("a", 1)
    run(where, env)
    path = up(env)
    read_end, write_end = os.pipe()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    socket.send_fds(conn, [b"\x00\x00\x00\x05nope!"], [write_end, write_end, write_end])
    os.close(write_end)
    conn.settimeout(10)
    assert conn.recv(1) == b""  # refused: closed
    conn.close()
    ready, _, _ = select.select([read_end], [], [], 10)
    assert ready and os.read(read_end, 1) == b""  # the server kept no copy of what it was sent
    os.close(read_end)
    assert "forked from" in run(where, env).stdout


def test_worktrees_whose_venv_links_to_one_share_a_server(project, tmp_path):
    make, env = project
    a, b = make("a", 1), make("b", 2)
    (tmp_path / "venv").mkdir()
    for where in (a, b):
        (where / ".venv").symlink_to(tmp_path / "venv")
    run(a, env, VIRTUAL_ENV=str(a / ".venv"), PATH=f"{a / '.venv' / 'bin'}:{env['PATH']}")
    up(env)
    shared = run(b, env, VIRTUAL_ENV=str(b / ".venv"), PATH=f"{b / '.venv' / 'bin'}:{env['PATH']}")
    assert "forked from" in shared.stdout and "run 1" in shared.stdout


def test_the_server_imports_with_pytorchs_fork_safe_cuda_check_and_the_run_gets_its_own_environment(project):
    """Inductor calls torch.cuda.is_available() at import: through the CUDA runtime it would initialise
    the driver in the server (no fork could use CUDA), through NVML it does not."""
    make, env = project
    where = make("a", 1)
    (where / "lib").mkdir()  # a library, outside the project: the fork keeps the server's import of it
    (where / "lib" / "probe.py").write_text("import os\nSEEN = os.environ.get('PYTORCH_NVML_BASED_CUDA_CHECK')\n")
    env = {**env, "AUTORESEARCH_FORKSERVER_IMPORTS": "json,probe", "PYTHONPATH": str(where / "lib")}
    run(where, env)
    up(env)
    code = "import os, sys, probe; print('probe', probe.SEEN, os.environ.get('PYTORCH_NVML_BASED_CUDA_CHECK'))"
    (where / "p.py").write_text(SCRIPT.split("import os, sys, time")[0] + code + "\n")
    result = subprocess.run([sys.executable, "p.py"], cwd=where, env=env, capture_output=True, text=True,
                            timeout=60)
    assert "forked from" in result.stdout and "probe 1 None" in result.stdout, result.stdout + result.stderr


def held_at_start(lib, word):
    """A sitecustomize in lib that holds an interpreter whose command line has `word` until the file
    lib/go exists (30 s at most): a server caught on its way up. The file's path."""
    gate = lib / "go"
    (lib / "sitecustomize.py").write_text(
        f"import os, sys, time\nif {word!r} in sys.orig_argv:\n    deadline = time.time() + 30\n"
        f"    while not os.path.exists({str(gate)!r}) and time.time() < deadline:\n        time.sleep(0.02)\n")
    return gate


def poisoned(where, env):
    """The runs' environment with a stand-in `torch` whose driver `poison` starts when imported."""
    lib = where / "lib"
    lib.mkdir(exist_ok=True)
    (lib / "torch.py").write_text("class cuda:\n    started = False\n\n"
                                  "    @staticmethod\n    def is_initialized():\n        return cuda.started\n")
    (lib / "poison.py").write_text("import torch\ntorch.cuda.started = True\n")
    return {**env, "AUTORESEARCH_FORKSERVER_IMPORTS": "json,torch,poison", "PYTHONPATH": str(lib)}


def test_an_import_that_starts_the_cuda_driver_is_left_to_the_runs(project):
    """A library whose import initialises the CUDA driver poisons every fork: the server starts again
    without it, and the forked runs say which (a stand-in `torch` here reports the driver started)."""
    make, env = project
    where = make("a", 1)
    env = poisoned(where, env)
    run(where, env)
    up(env)
    forked = run(where, env)
    assert forked.returncode == 0, forked.stderr
    assert forked.stdout.splitlines()[0].endswith("were imported before the run (not poison: importing it "
                                                  "initialised the CUDA driver)")


def test_a_server_started_from_a_removed_folder_serves_the_others(project):
    """spawn.sh confirm removes each run's worktree after it: the server that one started serves on."""
    make, env = project
    gone, other = make("gone", 1), make("other", 2)
    run(gone, env)
    up(env)
    shutil.rmtree(gone)
    result = run(other, env)
    assert result.returncode == 0, result.stderr
    assert "forked from" in result.stdout and f"run {other} ['s.py'] None 2" in result.stdout


def test_a_run_that_starts_while_the_server_comes_up_starts_no_second_one(project):
    """The starting run hands the key's lock to the server held: a run between the two (the server's
    interpreter held on its way up here) finds it taken, not free, and runs cold."""
    make, env = project
    where = make("a", 1)
    (where / "lib").mkdir()
    gate = held_at_start(where / "lib", "autoresearch.forkserver")
    env = {**env, "PYTHONPATH": str(where / "lib")}
    first = run(where, env)
    second = run(where, env)
    gate.touch()
    assert "cold; started a fork server" in first.stdout
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("imports:     cold (a fork server is starting for the next runs)")
    up(env)
    assert len(servers(env["TMPDIR"])) == 1
    assert "forked from" in run(where, env).stdout


def test_a_forked_run_does_not_hold_the_servers_lock(project):
    """A run outliving a killed server must not keep its key's lock: the next run starts a server."""
    make, env = project
    where = make("a", 1)
    run(where, env)
    up(env)
    waiting, forked = waiting_run(where, env)
    try:
        with open(f"/proc/{forked}/stat") as f:
            server = int(f.read().rsplit(")", 1)[1].split()[1])  # its parent
        os.kill(server, signal.SIGKILL)  # not the run: it shows as the server does in /proc
        wait_until(lambda: state(server) in (None, "Z"), "the server outlived SIGKILL")
        assert state(forked) == "S"
        assert "cold; started a fork server" in run(where, env).stdout
    finally:
        waiting.kill()
        waiting.wait()
        waiting.stdout.close()


def test_the_lock_is_held_while_the_server_starts_again_without_an_import(project):
    """The server's restart (an import started the CUDA driver) keeps the key's lock: a run meanwhile
    (the restarted interpreter held on its way up here) starts no second server."""
    make, env = project
    where = make("a", 1)
    env = poisoned(where, env)
    gate = held_at_start(where / "lib", "poison")  # the restart's command line names what it leaves out
    run(where, env)
    folder = Path(env["TMPDIR"], f"autoresearch-forkserver-{os.getuid()}")
    wait_until(lambda: "starting again without it" in "".join(p.read_text() for p in folder.glob("*.log")),
               "the server did not start again")
    during = run(where, env)
    gate.touch()
    assert during.stdout.startswith("imports:     cold (a fork server is starting for the next runs)")
    up(env)
    assert len(servers(env["TMPDIR"])) == 1


class FakeNvml:
    """NVML as ctypes sees it, for gpu_arch: each GPU's capability, or None for one that errs."""
    BASE = 0x7F0000000000  # handles are pointers: a high address must survive

    def __init__(self, caps, init=0):
        self.caps, self.init, self.shutdowns = caps, init, 0

    def nvmlInit_v2(self):
        return self.init

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount_v2(self, count):
        count._obj.value = len(self.caps)
        return 0

    def nvmlDeviceGetHandleByIndex_v2(self, index, handle):
        handle._obj.value = self.BASE + index
        return 0

    def nvmlDeviceGetCudaComputeCapability(self, handle, major, minor):
        cap = self.caps[handle.value - self.BASE]
        if cap is None:
            return 999
        major._obj.value, minor._obj.value = cap
        return 0


def test_gpu_arch_is_the_capability_every_gpu_shares(monkeypatch):
    import ctypes
    for caps, expected in (([(9, 0)] * 8, "90"), ([(10, 0)], "100"), ([(9, 0), (10, 0)], None),
                           ([(9, 0), None], None), ([], None)):
        nvml = FakeNvml(caps)
        monkeypatch.setattr(ctypes, "CDLL", lambda name: nvml)
        assert forkserver.gpu_arch() == expected, caps
        assert nvml.shutdowns == 1
    nvml = FakeNvml([(9, 0)], init=1)  # NVML would not start: nothing to shut down
    monkeypatch.setattr(ctypes, "CDLL", lambda name: nvml)
    assert forkserver.gpu_arch() is None and nvml.shutdowns == 0
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())  # a library without these functions
    assert forkserver.gpu_arch() is None

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert forkserver.gpu_arch() is None


def test_what_the_servers_imports_start_does_not_hold_its_lock(project):
    """A process an import starts with every descriptor (close_fds=False) outlives a killed server:
    it must not hold the key's lock, or no run would start a server again while it lives."""
    make, env = project
    where = make("a", 1)
    (where / "lib").mkdir()
    (where / "lib" / "spawner.py").write_text(
        "import os, subprocess\n"
        "child = subprocess.Popen(['sleep', '60'], close_fds=False)\n"
        "open(os.path.join(os.path.dirname(__file__), 'child.pid'), 'w').write(str(child.pid))\n")
    env = {**env, "AUTORESEARCH_FORKSERVER_IMPORTS": "json,spawner", "PYTHONPATH": str(where / "lib")}
    run(where, env)
    up(env)
    child = int((where / "lib" / "child.pid").read_text())
    try:
        for pid in servers(env["TMPDIR"]):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not servers(env["TMPDIR"]), "the server outlived SIGKILL")
        assert state(child) == "S"
        assert "cold; started a fork server" in run(where, env).stdout
    finally:
        os.kill(child, signal.SIGKILL)
