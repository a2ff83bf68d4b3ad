"""
The fork server: the libraries a run imports (torch, torch.compile's machinery, FA4)
imported once, each run forked from it. DO NOT MODIFY.

Importing is most of what a hyperparameter edit costs outside the budget: on an H100
machine (bench/README.md, 2026-12-07) torch took 4.5 s, dynamo 5 s, inductor 4 s (at
torch.compile) and FA4 4.5 s, against 4 s of tracing and cache loads. train.py calls
`hand_off(__file__)` before its own imports. When a server is up for this Python and
environment, the run continues in a fork of it with this process's arguments, folder,
environment variables and standard streams, and this process waits for it, passes
signals on (Ctrl-C, `timeout`'s SIGTERM) and ends as it ends: same output, same exit
status. If this process dies, the forked run is killed. When no server is up, the run
goes on here, cold, and starts one for the runs after it; the server exits after
AUTORESEARCH_FORKSERVER_IDLE minutes (20 by default) with no run in flight.

A forked run inherits the libraries and nothing else:
- nothing of the project is imported before the fork: each run imports constants.py,
  prepare.py and this package from its own folder (a worktree's own copy), as a cold run;
- CUDA is not initialised before the fork (checked after the imports: a library that
  did would break every fork, and the server then refuses, writing why);
- what a library may read at import is part of the key that names the server: the
  interpreter, its flags, sys.path and the packages installed there (their metadata's names and times),
  and the environment variables TORCH*, TRITON*, CUDA* (not CUDA_VISIBLE_DEVICES, read
  when CUDA starts, which only the forked run does), PYTHON*, ... (KEY_PREFIXES below).
  Change any and the next run is cold and starts a server of its own.

AUTORESEARCH_FORKSERVER: unset, on wherever an NVIDIA device is present (/dev/nvidiactl),
but not in a smoke run or under Slurm (a job step's end kills what it started); 1 on,
0 off. The run's first line says what happened: `imports: ...`.

Imported by train.py before torch: it imports only the standard library and
autoresearch.environment. `python -m autoresearch.forkserver serve KEY` is the server itself,
started by hand_off. The socket lives in a folder only this user may open
($TMPDIR/autoresearch-forkserver-UID, or under /tmp when $TMPDIR is long).
"""

import fcntl
import hashlib
import importlib
import importlib.util
import io
import json
import os
import runpy
import select
import signal
import socket
import stat
import struct
import sys
import tempfile
import threading
import time

from autoresearch import environment

IMPORTS = "torch,torch._dynamo,torch.compile,flash_attn.cute.interface,numpy,pyarrow.parquet,tiktoken"
KEY_PREFIXES = ("TORCH", "PYTORCH", "TRITON", "INDUCTOR", "CUDA", "NVIDIA", "NCCL", "FLASH", "CUTE", "CUTLASS",
                "PYTHON", "LD_", "OMP_", "MKL_", "KMP_", "OPENBLAS", "XDG_", "UV_", "CC", "CXX")
KEY_NAMES = ("PATH", "HOME", "USER", "TMPDIR", "TEMP", "TMP", "VIRTUAL_ENV",
             "AUTORESEARCH_LAUNCH")  # a night's own server: spawn.sh stop finds it, and its runs, by this
PER_RUN = ("CUDA_VISIBLE_DEVICES",)   # read when CUDA starts, in the forked run
START_WAIT = 60                       # seconds a server may take to fork a run it accepted
FORKED = None                         # in a forked run: what the server said about itself


def say(text):
    print(f"{'imports:':<13}{text}", flush=True)


def setting():
    """True, False, or None for auto (an NVIDIA device, not a smoke run, not under Slurm)."""
    on = environment.switch("AUTORESEARCH_FORKSERVER", None)
    if on is None:
        on = (sys.platform.startswith("linux") and os.path.exists("/dev/nvidiactl")
              and not environment.switch("AUTORESEARCH_SMOKE", False) and "SLURM_JOB_ID" not in os.environ)
    return on


def imports():
    return environment.text("AUTORESEARCH_FORKSERVER_IMPORTS", IMPORTS)


def idle_seconds():
    return 60 * environment.number("AUTORESEARCH_FORKSERVER_IDLE", 20.0)


def key():
    """16 hex digits naming what a fork inherits: interpreter, flags, paths, packages, environment."""
    h = hashlib.sha256()
    env = sorted((k, v) for k, v in os.environ.items()
                 if (k.startswith(KEY_PREFIXES) or k in KEY_NAMES) and k not in PER_RUN)
    paths = [os.path.realpath(p) for p in sys.path[1:]]  # [0] is the script's folder: each run's own
    h.update(json.dumps([os.path.realpath(sys.executable), sys.version, repr(sys.flags),
                         sorted(sys._xoptions.items()), imports(), paths, env], default=str).encode())
    for path in paths:  # a package installed, upgraded or removed changes a name or a time of its metadata
        try:
            with os.scandir(path) as entries:
                h.update(json.dumps(sorted((e.name, e.stat(follow_symlinks=False).st_mtime_ns) for e in entries
                                           if e.name.endswith((".dist-info", ".egg-info", ".pth")))).encode())
        except OSError:
            pass
    return h.hexdigest()[:16]


def folder():
    """This user's folder for sockets, locks and logs; OSError when it is not safely ours."""
    path = os.path.join(tempfile.gettempdir(), f"autoresearch-forkserver-{os.getuid()}")
    if len(path) > 75:  # a socket's path holds 108 bytes: a long $TMPDIR gives way to /tmp
        path = f"/tmp/autoresearch-forkserver-{os.getuid()}"
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise OSError(f"{path} is not a folder only this user may open")
    return path


# =============================================================================
# The run's side: hand off to a server, or run cold and start one
# =============================================================================


def hand_off(script):
    """Continue this run in a fork of the server when one is up (never returns then);
    else return, and the run goes on here, cold."""
    if FORKED is not None or not setting():
        return
    try:
        name, where = key(), folder()
    except OSError as e:
        return say(f"cold (no fork server: {e})")
    sock = os.path.join(where, name + ".sock")
    conn = connect(sock)
    if conn is None:
        return say(start(where, name))
    run_forked(conn, name, script, os.path.join(where, name + ".log"))


def connect(path):
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(2)
    try:
        conn.connect(path)
        return conn
    except OSError:
        conn.close()
        return None


def start(where, name):
    """Start a server for the runs after this one; the line this run prints."""
    refused = os.path.join(where, name + ".refused")
    if os.path.exists(refused):
        with open(refused) as f:
            return f"cold (the fork server refused this environment: {f.read().strip()})"
    with open(os.path.join(where, name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "cold (a fork server is starting for the next runs)"
    import subprocess  # only on this path
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(where, name + ".log"), "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "autoresearch.forkserver", "serve", name], cwd=root,
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    return (f"cold; started a fork server (pid {server.pid}) that imports them once for the next runs and "
            f"exits after {idle_seconds() / 60:g} min without one (AUTORESEARCH_FORKSERVER=0: none)")


def run_forked(conn, name, script, log):
    """Send this run to the server, wait for it, pass signals on, exit as it exits."""
    same = os.path.abspath(sys.argv[0]) == os.path.abspath(script)  # runpy sets argv[0] to the path it runs
    request = {"key": name, "argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ), "path": sys.path,
               "script": sys.argv[0] if same else os.path.abspath(script)}
    reader = conn.makefile("rb")
    try:
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        conn.settimeout(START_WAIT)
        reply = reader.readline()
    except socket.timeout:
        print(f"FAIL: the fork server took the run but did not start it within {START_WAIT} s (its log: {log}); "
              f"AUTORESEARCH_FORKSERVER=0 runs without it", file=sys.stderr, flush=True)
        os._exit(1)
    except OSError:
        reply = b""
    if not reply:  # it closed before forking (it was exiting): nothing ran, run here
        conn.close()
        return say("cold (the fork server was exiting)")
    pid = json.loads(reply)["pid"]
    conn.settimeout(None)

    def forward(signum, frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, forward)
    line = reader.readline()
    if not line:
        print(f"FAIL: the forked run (pid {pid}) ended without its exit status: the fork server stopped "
              f"(its log: {log})", file=sys.stderr, flush=True)
        os._exit(1)
    status = json.loads(line)["status"]  # os.waitstatus_to_exitcode: -N when killed by signal N
    if status < 0:  # die the same way, so a shell or `timeout` sees what it would have seen
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        status = 128 - status
    os._exit(status)


# =============================================================================
# The server's side
# =============================================================================


def import_all(names):
    """Import what a run will; returns what was skipped (not installed)."""
    skipped = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name == "torch.compile":  # building a compiled function imports inductor, its backend
            import torch
            torch.compile(lambda x: x, dynamic=False)
            continue
        if name.startswith("flash_attn"):
            os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")  # as attention.py, before import
        try:
            if importlib.util.find_spec(name.split(".")[0]) is None:
                skipped.append(name)
                continue
            importlib.import_module(name)
        except Exception as e:  # a broken optional library: the run meets it itself, cold or forked
            skipped.append(f"{name} ({type(e).__name__})")
    return skipped


def cuda_started():
    """Why forking is unsafe now, or None: CUDA initialised by torch or by the driver itself."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "importing the libraries initialised CUDA"
    with open("/proc/self/maps") as f:
        if "libcuda.so" not in f.read():
            return None
    import ctypes
    count = ctypes.c_int()
    if ctypes.CDLL("libcuda.so.1").cuDeviceGetCount(ctypes.byref(count)) != 3:  # 3: CUDA_ERROR_NOT_INITIALIZED
        return "importing the libraries initialised the CUDA driver"
    return None


def serve(name):
    """The server: import, then fork a run per request. Returns (request, conn, fds) in a
    forked run, None when the server is done."""
    where = folder()
    lock = open(os.path.join(where, name + ".lock"), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None  # another server for this key is up or starting
    if key() != name:
        print("the environment changed before the server started", flush=True)
        return None
    t0 = time.time()
    skipped = import_all(imports())
    why = cuda_started() or (f"{threading.active_count()} Python threads after the imports"
                             if threading.active_count() > 1 else None)
    if why:
        with open(os.path.join(where, name + ".refused"), "w") as f:
            f.write(why + "\n")
        print(f"refused: {why}", flush=True)
        return None
    sock_path = os.path.join(where, name + ".sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path + f".{os.getpid()}")
    listener.listen(64)
    os.replace(sock_path + f".{os.getpid()}", sock_path)
    inode = os.stat(sock_path).st_ino
    started, runs, children, last = time.time(), 0, {}, time.time()
    print(f"serving {sock_path}: imported {imports()} in {started - t0:.1f} s"
          + (f" (not installed: {', '.join(skipped)})" if skipped else ""), flush=True)
    moved = False
    while children or not (moved or time.time() - last > idle_seconds()):
        ready, _, _ = select.select([] if moved else [listener], [], [], 0.1)
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                reply(children.pop(pid), {"status": os.waitstatus_to_exitcode(status)})
                last = time.time()
        if ready:
            conn, _ = listener.accept()
            request, fds = receive(conn, name)
            if request is None:
                conn.close()
                continue
            runs += 1
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:  # the forked run: leave the server's loop with what it needs
                listener.close()
                lock.close()
                for other in children.values():
                    other.close()
                request["server"] = {"pid": os.getppid(), "up": time.time() - started, "run": runs}
                return request, conn, fds
            for fd in fds:
                os.close(fd)
            reply(conn, {"pid": pid})
            children[pid] = conn
            last = time.time()
        if not moved:
            try:
                moved = os.stat(sock_path).st_ino != inode
            except OSError:
                moved = True  # removed (its folder cleaned up) or replaced: take no new runs, finish these
    listener.close()
    if not moved:
        os.unlink(sock_path)
    print(f"exiting after {runs} runs", flush=True)
    return None


def receive(conn, name):
    """A run's request and its three standard streams, or (None, []) for a bad one."""
    conn.settimeout(5)
    try:
        pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        while data and not data.endswith(b"\n"):
            more = conn.recv(1 << 16)
            if not more:
                break
            data += more
        request = json.loads(data)
    except (OSError, ValueError) as e:
        print(f"a bad request: {e}", flush=True)
        return None, []
    if uid != os.getuid() or len(fds) != 3 or request.get("key") != name:
        for fd in fds:
            os.close(fd)
        return None, []
    conn.settimeout(None)
    return request, fds


def reply(conn, message):
    try:
        conn.sendall(json.dumps(message).encode() + b"\n")
    except OSError:
        pass  # the run's process is gone
    if "status" in message:
        conn.close()


def become_the_run(request, conn, fds):
    """In the fork: take the run's streams, folder, environment and paths, then run its script
    as __main__ with a fresh import of the project; returns the exit status."""
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    # new standard streams on the run's descriptors, made as the interpreter makes its own
    unbuffered, encoding = sys.stdout.write_through, sys.stdout.encoding  # -u or PYTHONUNBUFFERED: write through
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                                 encoding=encoding)
    for target, name in ((1, "stdout"), (2, "stderr")):
        raw = io.FileIO(target, "w", closefd=False)
        stream = io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw), encoding=encoding,
                                  errors="backslashreplace" if target == 2 else "strict",
                                  line_buffering=target == 2 or raw.isatty(), write_through=unbuffered)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv[:] = request["argv"]
    sys.path[:] = request["path"]
    for module in [m for m in sys.modules if m == "autoresearch" or m.startswith("autoresearch.")]:
        del sys.modules[module]  # the server's own copy: the run imports its folder's
    server = request["server"]
    importlib.import_module("autoresearch.forkserver").FORKED = server  # its hand_off then returns at once

    def watch():  # the run's process went away (killed, its terminal closed): so does the run
        try:
            while conn.recv(1 << 10):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, daemon=True, name="forkserver-watch").start()
    up = f"{server['up']:.0f} s" if server["up"] < 120 else f"{server['up'] / 60:.0f} min"
    say(f"forked from the fork server (pid {server['pid']}, up {up}, run {server['run']}): its libraries "
        f"were imported before the run")
    try:
        runpy.run_path(request["script"], run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # as an interpreter ends on an uncaught Ctrl-C
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1
    return 0


def main(argv):
    if argv[:1] != ["serve"] or len(argv) != 2:
        raise SystemExit("usage: python -m autoresearch.forkserver serve KEY (hand_off starts it)")
    forked = serve(argv[1])
    if forked is None:
        return 0
    return become_the_run(*forked)  # the interpreter then ends as a run's would: threads, atexit, flush


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
