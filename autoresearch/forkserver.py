"""
The fork server: the libraries a run imports (torch, torch.compile's machinery, FA4)
imported once, each run forked from it. DO NOT MODIFY.

Importing is most of what a hyperparameter edit costs outside the budget: on an H100
machine (bench/README.md, 2026-12-07) torch took 4.5 s, dynamo 5 s, inductor 4 s (at
torch.compile) and FA4 4.5 s, against 4 s of tracing and cache loads. train.py calls
`hand_off(__file__)` before its own imports. When a server is up for this Python and
environment, the run continues in a fork of it with this process's arguments, folder,
environment variables, standard streams and ignored signals, and this process waits
for it, passes signals on (Ctrl-C, `timeout`'s SIGTERM, Ctrl-Z) and ends as it ends:
same output, same exit status (the same signal, if the run died of one). If this process
dies, the server kills the run. When no server is up, the run goes on here, cold, and
starts one for the runs after it; the server exits after AUTORESEARCH_FORKSERVER_IDLE
minutes (20 by default) with no run in flight, and on SIGTERM once its runs are done.

What a forked run inherits is the libraries, and the number is a cold run's:
- nothing of the project is imported before the fork: each run imports constants.py,
  prepare.py and this package from its own folder (a worktree's own copy), as a cold run;
- CUDA is not initialised before the fork: the server imports with PyTorch's fork-safe
  device check (NVML), QUACK_ARCH from NVML for FA4's quack where the GPUs have one
  compute capability, and CUDA_VISIBLE_DEVICES unset; it checks the driver after each
  import, and starts again without an import that initialised it;
- what a library may read at import is part of the key that names the server: this
  file, the interpreter and its options, sys.path and the packages installed there
  (their metadata's names and times), the environment variables TORCH*, TRITON*,
  CUDA* (not CUDA_VISIBLE_DEVICES, read when CUDA starts, in the run), PYTHON*, ...
  (KEY_PREFIXES below), and the process's affinity, nice value, limits, umask and
  cgroup. Change any and the next run is cold and starts a server of its own.
Beyond the libraries a fork shares with the server what no number depends on: the
string-hash seed, warnings the imports already gave (in the server's log), and what
tools read from /proc (the command line `autoresearch.forkserver serve KEY ...`, the first
run's environment).

AUTORESEARCH_FORKSERVER: unset, on wherever an NVIDIA device is present (/dev/nvidiactl),
but not in a smoke run or under Slurm (a job step's end kills what it started); 1 on,
0 off. The run's first line says what happened: `imports: ...`.

Imported by train.py before torch: it imports only the standard library and
autoresearch.environment. `python -m autoresearch.forkserver serve KEY FD [WITHOUT]` is the server,
started by hand_off. The socket lives in a folder only this user may open
($TMPDIR/autoresearch-forkserver-UID, or under /tmp when $TMPDIR is long).
"""

import atexit
import fcntl
import hashlib
import importlib
import importlib.machinery
import importlib.util
import io
import json
import os
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
                "PYTHON", "LD_", "OMP_", "MKL_", "KMP_", "OPENBLAS", "GOMP_", "MALLOC_", "NPY_", "NUMPY_", "ARROW_",
                "QUACK", "LANG", "LC_", "TZ", "XDG_", "UV_", "CC", "CXX")
KEY_NAMES = ("HOME", "USER", "TMPDIR", "TEMP", "TMP",
             "AUTORESEARCH_LAUNCH")  # a night's own server: spawn.sh stop finds it, and its runs, by this
KEY_PATHS = ("PATH", "VIRTUAL_ENV")   # by their real paths: a worktree's linked .venv is the repository's
PER_RUN = ("CUDA_VISIBLE_DEVICES",)   # read when CUDA starts, in the forked run
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
START_WAIT = 60                       # seconds a server may take to fork a run it accepted
FORKED = None                         # in a forked run: what the server said about itself (mark_forked)


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


def mark_forked(server):
    global FORKED
    FORKED = server


def key():
    """16 hex digits naming what a fork inherits: this file, the interpreter and its flags, its paths and
    packages, the environment a library may read at import, and the process's own settings."""
    import resource
    h = hashlib.sha256()
    env = sorted((k, v) for k, v in os.environ.items()
                 if (k.startswith(KEY_PREFIXES) or k in KEY_NAMES) and k not in PER_RUN + KEY_PATHS)
    env += [(k, [os.path.realpath(p) for p in os.environ[k].split(os.pathsep)]) for k in KEY_PATHS
            if k in os.environ]
    paths = [os.path.realpath(p) for p in sys.path[1:]]  # [0] is the script's folder: each run's own
    umask = os.umask(0o022)
    os.umask(umask)
    limits = {name: resource.getrlimit(getattr(resource, name)) for name in dir(resource) if name.startswith("RLIMIT_")}
    with open(__file__, "rb") as f:
        this = hashlib.sha256(f.read()).hexdigest()
    with open("/proc/self/cgroup") if os.path.exists("/proc/self/cgroup") else io.StringIO() as f:
        cgroup = f.read()
    h.update(json.dumps([this, os.path.realpath(sys.executable), sys.version, repr(sys.flags),
                         sorted(sys._xoptions.items()), sys.warnoptions, imports(), paths, env,
                         sorted(os.sched_getaffinity(0)), os.getpriority(os.PRIO_PROCESS, 0), limits, umask, cgroup],
                        default=str).encode())
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


def send_message(conn, message, fds=()):
    """A length, then the JSON; the descriptors ride with the length."""
    data = json.dumps(message).encode()
    header = struct.pack("!I", len(data))
    if fds:
        socket.send_fds(conn, [header], list(fds))
    else:
        conn.sendall(header)
    conn.sendall(data)


# =============================================================================
# The run's side: hand off to a server, or run cold and start one
# =============================================================================


def hand_off(script):
    """Continue this run in a fork of the server when one is up (never returns then);
    else return, and the run goes on here, cold."""
    if FORKED is not None or not setting():
        return
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
    except OSError:
        return say("cold (a standard stream is closed: the fork server needs all three)")
    try:
        name, where = key(), folder()
    except OSError as e:
        return say(f"cold (no fork server: {e})")
    conn = connect(os.path.join(where, name + ".sock"))
    if conn is None:
        return say(start(where, name))
    run_forked(conn, name, script, where)


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
            return (f"cold (the fork server refused this environment: {f.read().strip()}; delete {refused} "
                    f"to try again)")
    import subprocess  # only on this path
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # the venv through its real folder: a worktree's linked .venv may be removed with the worktree
    python = os.path.join(os.path.realpath(sys.prefix), "bin", os.path.basename(sys.executable))
    # The lock goes to the server held: no second run starting with this one finds it free (and
    # starts a second server) while the server's interpreter comes up.
    with open(os.path.join(where, name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "cold (a fork server is starting for the next runs)"
        try:
            with open(os.path.join(where, name + ".log"), "a") as log:
                server = subprocess.Popen([python if os.path.exists(python) else sys.executable,
                                           *interpreter_options(), "-m", "autoresearch.forkserver", "serve", name,
                                           str(lock.fileno())], cwd=root, pass_fds=(lock.fileno(),),
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        except OSError as e:
            return f"cold (no fork server: {e})"
    server.returncode = 0  # it outlives this process on purpose: no "still running" warning at exit
    return (f"cold; started a fork server (pid {server.pid}) that imports them once for the next runs and "
            f"exits after {idle_seconds() / 60:g} min without one (AUTORESEARCH_FORKSERVER=0: none)")


def interpreter_options():
    """This interpreter's options (-O, -X ..., -W ...), which the key holds, so the server must have them."""
    argv, orig = sys.argv, getattr(sys, "orig_argv", [])
    if argv and len(orig) > len(argv) and orig[len(orig) - len(argv) + 1:] == argv[1:]:
        return orig[1:len(orig) - len(argv)]
    import subprocess
    return subprocess._args_from_interpreter_flags()


def streams():
    """How this process's standard streams are set up, for the fork to make its own the same way."""
    return {name: [stream.encoding, stream.errors, stream.line_buffering, stream.write_through]
            for name in ("stdin", "stdout", "stderr") if isinstance(stream := getattr(sys, name), io.TextIOWrapper)}


def run_forked(conn, name, script, where):
    """Send this run to the server, wait for it, pass signals on, exit as it exits. Returns only
    when nothing was forked (the run goes on here, cold, and a new server is started)."""
    log = os.path.join(where, name + ".log")
    ignored = [s for s in FORWARDED if signal.getsignal(s) == signal.SIG_IGN]  # nohup, `cmd &`: so will the run
    request = {"key": name, "argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ), "path": sys.path,
               "script": os.path.abspath(script), "ignored": ignored, "streams": streams()}
    # The handlers go in before the request: a signal may come before the run's pid does. Ctrl-Z then
    # waits for the pid. A signal that would end the run shuts the connection, which ends the hand-off
    # wherever it is (the server kills a run it forked for a closed one), and this process dies of it
    # as it would have without these handlers.
    pid, stop_pending, ending, resent = None, False, None, False
    reader = conn.makefile("rb")

    def forward(signum, frame):
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(signum, frame):  # Ctrl-Z: stop the run, then this process; SIGCONT resumes both
        forward(signal.SIGSTOP, frame)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)

    def resume(signum, frame):
        signal.signal(signal.SIGTSTP, stop)
        forward(signal.SIGCONT, frame)

    def before_pid(signum, frame):
        nonlocal stop_pending, ending
        if signum in (signal.SIGTSTP, signal.SIGCONT):
            stop_pending = signum == signal.SIGTSTP  # pressed twice, or undone by fg: one state
        elif not ending:
            ending = signum
            try:
                conn.shutdown(socket.SHUT_RDWR)  # what waits on the connection returns now
            except OSError:
                pass
    handlers = {signum: forward for signum in FORWARDED if signum not in ignored}
    handlers.update({signal.SIGCONT: resume, signal.SIGTSTP: stop})  # resume first: see the swap below
    before = {}
    for signum in handlers:
        before[signum] = signal.signal(signum, before_pid)

    def restore():  # the handlers as they were, and what they missed sent again: as if it came now
        nonlocal stop_pending, resent
        for signum, handler in before.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if ending:
            if not resent:  # once: a second restore (on the way out of a KeyboardInterrupt) sends none
                resent = True
                os.kill(os.getpid(), ending)  # its action: death, or Ctrl-C's KeyboardInterrupt
        elif stop_pending:
            stop_pending = False
            os.kill(os.getpid(), signal.SIGTSTP)

    def close():
        reader.close()
        conn.close()

    def end():
        close()
        restore()
        os._exit(128 + ending)

    def cold(why):
        close()
        restore()
        say(start(where, name).replace("cold", f"cold ({why})", 1))
    try:
        try:
            send_message(conn, request, (0, 1, 2))
        except OSError:  # not all of it went: the server refuses what it cannot read whole, so nothing ran
            return end() if ending else cold("the fork server did not take the run")
        try:
            conn.settimeout(START_WAIT)
            first = read_message(reader)
        except TimeoutError:
            print(f"FAIL: the fork server took the run but did not start it within {START_WAIT} s (its log: "
                  f"{log}); AUTORESEARCH_FORKSERVER=0 runs without it", file=sys.stderr, flush=True)
            os._exit(1)
        except OSError:
            first = None
        if ending:
            return end()
        if not isinstance(first, dict) or "pid" not in first:  # it closed before forking (it was exiting)
            return cold("the fork server was exiting")
        pid, own = first["pid"], None
        conn.settimeout(None)
        for signum, handler in handlers.items():  # SIGCONT's before SIGTSTP's: a Ctrl-Z between finds its fg
            signal.signal(signum, handler)
        if ending:  # came during the swap: the run is killed for the closed connection
            return end()
    except BaseException:
        restore()
        raise
    if stop_pending:
        stop_pending = False
        stop(signal.SIGTSTP, None)
    while True:
        message = read_message(reader)
        if message is None:
            break
        if "status" in message:
            exit_as(message["status"])
        own = message.get("own_status", own)
    if own is not None:  # the server went away; the run said how it ended
        exit_as(own)
    print(f"FAIL: the forked run (pid {pid}) ended without its exit status: the fork server stopped "
          f"(its log: {log})", file=sys.stderr, flush=True)
    os._exit(1)


def read_message(reader):
    header = reader.read(4)
    if len(header) < 4:
        return None
    data = reader.read(struct.unpack("!I", header)[0])
    return json.loads(data)


def exit_as(status):
    """Exit with the run's status (os.waitstatus_to_exitcode: -N for signal N), dying of the same signal."""
    sys.stdout.flush()
    sys.stderr.flush()
    if status < 0:
        if -status not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        status = 128 - status
    os._exit(status)


# =============================================================================
# The server's side
# =============================================================================


def import_all(names, without=()):
    """Import what a run will, but `without`; returns (what was skipped, the first import that
    initialised the CUDA driver or None: the process is then no use to fork)."""
    # Inductor asks torch.cuda.is_available() at import. Through the CUDA runtime that initialises the
    # driver, after which no fork can use CUDA; through NVML (PyTorch's switch for forking servers) it
    # does not. Only the server's environment: a forked run takes the run's own.
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)  # what an import sees of the GPUs: all of them, as no run's
    skipped = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name in without:
            skipped.append(f"{name} (it initialised the CUDA driver)")
            continue
        if name.startswith("flash_attn"):
            os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")  # as attention.py, before import
        if name.startswith(("flash_attn", "quack")):
            # FA4's quack asks torch for the GPU's capability at import, which starts the driver; QUACK_ARCH
            # answers instead. Only where all GPUs have one capability: what quack caches is then any run's.
            if "QUACK_ARCH" not in os.environ and (arch := gpu_arch()):
                os.environ["QUACK_ARCH"] = arch
        try:
            if name == "torch.compile":  # building a compiled function imports inductor, its backend
                import torch
                torch.compile(lambda x: x, dynamic=False)
            elif importlib.util.find_spec(name.split(".")[0]) is None:
                skipped.append(f"{name} (not installed)")
            else:
                importlib.import_module(name)
        except Exception as e:  # a broken optional library: the run meets it itself, cold or forked
            skipped.append(f"{name} ({type(e).__name__})")
        if cuda_driver_started():
            return skipped, name
    return skipped, None


def gpu_arch():
    """The compute capability every GPU here shares, as NVML (not CUDA) reports it: "90" on
    Hopper; None without NVML, without GPUs, or with GPUs of more than one capability."""
    import ctypes
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return None
    except (OSError, AttributeError):  # no NVML, or one without these functions (a very old driver)
        return None
    try:
        count, archs = ctypes.c_uint(), set()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        for i in range(count.value):
            handle, major, minor = ctypes.c_void_p(), ctypes.c_int(), ctypes.c_int()
            if (nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) != 0 or
                    nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) != 0):
                return None
            archs.add(f"{major.value}{minor.value}")
        return archs.pop() if len(archs) == 1 else None
    except AttributeError:
        return None
    finally:
        nvml.nvmlShutdown()


def cuda_driver_started():
    """Whether this process initialised the CUDA driver (cuInit): a fork of it could not use CUDA."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return True
    with open("/proc/self/maps") as f:
        if "libcuda.so" not in f.read():
            return False
    import ctypes
    count = ctypes.c_int()
    return ctypes.CDLL("libcuda.so.1").cuDeviceGetCount(ctypes.byref(count)) != 3  # 3: CUDA_ERROR_NOT_INITIALIZED


def serve(name, lock, without=()):
    """The server: import, then fork a run per request. Returns (request, conn, fds) in a
    forked run, None when the server is done. `lock` is the descriptor of the key's lock,
    taken by the run that started it and held as long as this server lives. An import that
    initialises the CUDA driver makes the server start again without it (a fresh process:
    the driver cannot be undone), the lock held across."""
    where = folder()
    try:
        mine = os.fstat(lock)
        held = os.stat(os.path.join(where, name + ".lock"))
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held already, through this descriptor
    except OSError as e:
        print(f"no lock for this key: {e}", flush=True)
        return None
    if (mine.st_dev, mine.st_ino) != (held.st_dev, held.st_ino):
        print(f"descriptor {lock} is not this key's lock", flush=True)
        return None
    os.set_inheritable(lock, False)  # pass_fds made it inheritable: nothing an import starts may hold it
    if key() != name:
        print("the environment changed before the server started", flush=True)
        return None
    t0, environ = time.time(), dict(os.environ)  # as started: the imports set variables of their own
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project folder it was started from
    skipped, culprit = import_all(imports(), without)
    if culprit:
        print(f"importing {culprit} initialised the CUDA driver: starting again without it", flush=True)
        os.set_inheritable(lock, True)
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:sys.orig_argv.index("-m")], "-m",
                                   "autoresearch.forkserver", "serve", name, str(lock),
                                   ",".join([*without, culprit])], environ)
    if threading.active_count() > 1:  # threads of native libraries that handle fork (OpenBLAS's) are not seen
        why = f"{threading.active_count()} Python threads after the imports"
        with open(os.path.join(where, name + ".refused"), "w") as f:
            f.write(why + "\n")
        print(f"refused: {why}", flush=True)
        return None
    os.chdir(where)  # not the project folder: a worktree may be removed while the server serves others
    stopping = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))  # finish the runs in flight
    sock_path = os.path.join(where, name + ".sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path + f".{os.getpid()}")
    listener.listen(64)
    os.replace(sock_path + f".{os.getpid()}", sock_path)
    inode = os.stat(sock_path).st_ino
    started, runs, children, last = time.time(), 0, {}, time.time()
    print(f"serving {sock_path}: imported {imports()} in {started - t0:.1f} s"
          + (f"; not: {', '.join(skipped)}" if skipped else ""), flush=True)
    killed = set()  # runs whose waiting process has gone
    while listener or children:
        watched = {conn: pid for pid, conn in children.items() if pid not in killed}
        ready, _, _ = select.select(([listener] if listener else []) + list(watched), [], [], 0.1)
        for conn in [c for c in ready if c in watched]:
            try:
                gone = not conn.recv(1 << 10)  # a run's waiting process sends nothing more: this is its end
            except OSError:
                gone = True
            if gone:  # the waiting process died: so does its run, even a stopped one (Ctrl-Z, then kill -9)
                os.kill(watched[conn], signal.SIGKILL)
                killed.add(watched[conn])
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                killed.discard(pid)
                reply(children.pop(pid), {"status": os.waitstatus_to_exitcode(status)})
                last = time.time()
        if listener in ready:
            conn, _ = listener.accept()
            request, fds = receive(conn, name)
            if request is None:
                conn.close()
                continue
            runs += 1
            sys.stdout.flush()
            sys.stderr.flush()
            # Blocked across the fork: a signal for the run that comes before it has its own handlers (the
            # server's take SIGTERM) waits for them; become_the_run unblocks it.
            signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
            pid = os.fork()
            if pid:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
            if pid == 0:  # the forked run: leave the server's loop with what it needs
                listener.close()
                os.close(lock)
                for other in children.values():
                    other.close()
                request["server"] = {"pid": os.getppid(), "up": time.time() - started, "run": runs,
                                     "root": root, "without": list(without)}
                return request, conn, fds
            for fd in fds:
                os.close(fd)
            reply(conn, {"pid": pid})
            children[pid] = conn
            last = time.time()
        try:
            moved = os.stat(sock_path).st_ino != inode
        except OSError:
            moved = True  # removed (its folder cleaned up) or replaced
        if listener and (moved or stopping or (not children and time.time() - last > idle_seconds())):
            listener.close()  # no new runs; the ones in flight finish and get their status
            listener = None
            if not moved:
                os.unlink(sock_path)
    print(f"exiting after {runs} runs", flush=True)
    return None


def receive(conn, name):
    """A run's request and its three standard streams, or (None, []) for a bad one; nothing
    received stays open on a refusal."""
    fds = []
    try:
        pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
        conn.settimeout(10)
        header, fds, _, _ = socket.recv_fds(conn, 4, 3, socket.MSG_CMSG_CLOEXEC)
        header += receive_exactly(conn, 4 - len(header))
        size = struct.unpack("!I", header)[0]
        if size > 64 << 20:
            raise ValueError(f"a request of {size} bytes")
        request = json.loads(receive_exactly(conn, size))
        good = (isinstance(request, dict) and uid == os.getuid() and len(fds) == 3 and request.get("key") == name
                and {"argv", "cwd", "env", "path", "script", "ignored", "streams"} <= request.keys())
    except (OSError, ValueError, struct.error) as e:
        print(f"a bad request: {e}", flush=True)
        good = False
    if not good:
        for fd in fds:
            os.close(fd)
        return None, []
    conn.settimeout(None)
    return request, fds


def receive_exactly(conn, size):
    data = b""
    while len(data) < size:
        more = conn.recv(min(size - len(data), 1 << 20))
        if not more:
            raise ValueError("the request ended early")
        data += more
    return data


def reply(conn, message):
    try:
        send_message(conn, message)
    except OSError:
        pass  # the run's process is gone
    if "status" in message:
        conn.close()


def become_the_run(request, conn, fds):
    """In the fork: take the run's streams, folder, environment, paths and ignored signals, import the
    project afresh from the run's folder, then run its script as __main__. Returns its exit status,
    or None after an uncaught Ctrl-C (main ends the interpreter on SIGINT, as Python does)."""
    for signum in FORWARDED:
        signal.signal(signum, signal.SIG_IGN if signum in request["ignored"] else signal.SIG_DFL)
    if signal.SIGINT not in request["ignored"]:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):  # first: whatever fails from here on is said on the run's stderr
        os.dup2(fd, target)  # the copy is inheritable, as the run's own streams were
        os.close(fd)
    for target, name in enumerate(("stdin", "stdout", "stderr")):  # made as the run's own were (-u, encoding)
        if name not in request["streams"]:
            continue
        encoding, errors, line_buffering, write_through = request["streams"][name]
        raw = io.FileIO(target, "w" if target else "r", closefd=False)
        layer = (raw if write_through else io.BufferedWriter(raw)) if target else io.BufferedReader(raw)
        stream = io.TextIOWrapper(layer, encoding=encoding, errors=errors, newline="\n",
                                  line_buffering=line_buffering, write_through=write_through)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    try:
        os.chdir(request["cwd"])
    except OSError as e:
        print(f"FAIL: the run's folder is gone: {e}", file=sys.stderr, flush=True)
        return 1
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv[:] = request["argv"]
    sys.path[:] = request["path"]
    root = request["server"]["root"]  # the server's project folder (its .venv may lie inside: not that)
    for module in [m for m, mod in sys.modules.items() if m == "autoresearch" or m.startswith("autoresearch.")
                   or os.path.dirname(getattr(mod, "__file__", None) or "") == root]:
        del sys.modules[module]  # the server's own copies: the run imports its folder's
    mp = sys.modules.get("multiprocessing.process")
    if mp is not None:
        mp.ORIGINAL_DIR = request["cwd"]  # spawned workers find the run's script from here
    dynamo = sys.modules.get("torch._dynamo.config")
    if dynamo is not None:  # set from the folder at import: the server's, not the run's
        dynamo.debug_dir_root = os.path.join(request["cwd"], "torch_compile_debug")
    server = request["server"]
    importlib.import_module("autoresearch.forkserver").mark_forked(server)  # its hand_off returns at once

    def watch():  # the run's process went away (killed, its terminal closed): so does the run
        try:
            while conn.recv(1 << 10):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, daemon=True, name="forkserver-watch").start()
    up = f"{server['up']:.0f} s" if server["up"] < 120 else f"{server['up'] / 60:.0f} min"
    said = (f"forked from the fork server (pid {server['pid']}, up {up}, run {server['run']}): its libraries "
            f"were imported before the run")
    if server["without"]:
        said += f" (not {', '.join(server['without'])}: importing it initialised the CUDA driver)"
    say(said)
    path = request["script"]
    main = type(sys)("__main__")  # as the interpreter makes it for a script
    main.__file__, main.__builtins__, main.__spec__ = path, __builtins__, None
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", path)
    sys.modules["__main__"] = main
    try:
        with open(path, "rb") as f:
            code = compile(f.read(), path, "exec", dont_inherit=True)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # blocked since the fork: now the run's own
        exec(code, vars(main))
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return (e.code or 0) % 256  # as the process's exit would make it: sys.exit(-1) is 255
        print(e.code, file=sys.stderr)
        return 1
    except BaseException as e:  # the traceback Python prints, from the run's frames on (not this one)
        sys.excepthook(type(e), e, e.with_traceback(e.__traceback__.tb_next or e.__traceback__).__traceback__)
        return None if isinstance(e, KeyboardInterrupt) else 1
    return 0


def main(argv):
    if argv[:1] != ["serve"] or len(argv) not in (3, 4) or not argv[2].isdigit():
        raise SystemExit("usage: python -m autoresearch.forkserver serve KEY LOCK_FD [WITHOUT,...] "
                         "(hand_off starts it)")
    forked = serve(argv[1], int(argv[2]), tuple(n for n in (argv[3] if len(argv) == 4 else "").split(",") if n))
    if forked is None:
        return 0
    code = become_the_run(*forked)
    # at exit, the run's own status: its waiting process takes it if the server is gone by then
    atexit.register(reply, forked[1], {"own_status": -signal.SIGINT if code is None else code})
    if code is None:  # an uncaught Ctrl-C: the interpreter exits on SIGINT after its exit handlers, as a run's
        sys.excepthook = lambda *args: None  # its traceback is printed already
        raise KeyboardInterrupt
    return code  # the interpreter then ends as a run's would: threads, exit handlers, flush


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
