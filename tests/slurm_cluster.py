"""
A real one-node Slurm cluster on this machine, for tests (used by test_slurm.py).

    from slurm_cluster import SlurmCluster
    with SlurmCluster(folder) as cluster:      # munged, slurmctld, slurmd up
        subprocess.run(["srun", "true"], env=cluster.env())

Debian's munge, slurmctld, slurmd and slurm-client (`.ci/run` installs them).
Everything lives in one folder: the munge key and socket, slurm.conf, the
controller's state, slurmd's spool, the logs and the pid files. The daemons
listen on free ports of 127.0.0.1 only, the node has no GPUs, and `stop()`
ends each daemon by the pid in its pid file. Clients find the cluster through
`SLURM_CONF` (see `env()`).
"""

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("srun", "squeue", "scancel", "sinfo")
INSTALL = "apt-get install -y slurmctld slurmd slurm-client munge (.ci/run does)"


def find_tool(name):
    """The tool on PATH, or in the sbin folders a non-login PATH may lack."""
    found = shutil.which(name)
    for folder in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        found = found or shutil.which(name, path=folder)
    return found


def missing_tools():
    return [name for name in DAEMONS + CLIENTS if find_tool(name) is None]


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class SlurmCluster:
    """munged + slurmctld + slurmd for one node named after this host, no GPUs."""

    def __init__(self, folder, cpus=8):
        self.dir = Path(folder)
        self.cpus = cpus  # more than the 2 CI cores, so a few jobs run at once
        self.host = socket.gethostname().split(".")[0]  # slurmctld matches it against SlurmctldHost
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.conf = self.dir / "slurm.conf"
        self.pid_files = {name: self.dir / f"{name}.pid" for name in DAEMONS}
        self.logs = {name: self.dir / f"{name}.log" for name in DAEMONS}

    # -------------------------------------------------------------------------
    # Start and stop
    # -------------------------------------------------------------------------

    def start(self, timeout=30.0):
        missing = missing_tools()
        if missing:
            raise RuntimeError(f"Slurm test cluster: {', '.join(missing)} not installed: {INSTALL}")
        for sub in ("munge", "state", "spool"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "munge").chmod(0o700)
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._write_conf()
        # --force: munged refuses sockets outside its usual /run/munge otherwise.
        self._daemon("munged", [find_tool("munged"), "--force", f"--socket={self.munge_socket}",
                                f"--key-file={key}", f"--pid-file={self.pid_files['munged']}",
                                f"--log-file={self.logs['munged']}", f"--seed-file={self.dir / 'munge' / 'seed'}"])
        self._wait(lambda: self.munge_socket.exists(), 10, "munged never made its socket")
        self._daemon("slurmctld", [find_tool("slurmctld"), "-i", "-f", str(self.conf)])
        self._daemon("slurmd", [find_tool("slurmd"), "-f", str(self.conf)])
        self._wait(self._node_ready, timeout, "the node never became idle")
        return self

    def stop(self):
        """TERM each daemon by its pid file (slurmd first), KILL what outlives 10 s."""
        for name in reversed(DAEMONS):
            pid = self._pid(name)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -------------------------------------------------------------------------
    # For the tests
    # -------------------------------------------------------------------------

    def env(self, base=None):
        """An environment whose Slurm clients talk to this cluster."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def jobs(self):
        """[(job id, name, state)] of every job the controller still lists."""
        out = subprocess.run([find_tool("squeue"), "-h", "-o", "%i|%j|%T"], env=self.env(),
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return [tuple(line.split("|")) for line in out.splitlines() if line]

    def log_tail(self, lines=30):
        """The last lines of each daemon's log, for assertion messages."""
        parts = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(no log)"]
            parts.append(f"--- {name} ---\n" + "\n".join(text))
        return "\n".join(parts)

    # -------------------------------------------------------------------------
    # Internals
    # -------------------------------------------------------------------------

    def _write_conf(self):
        user = getpass.getuser()
        d = self.dir
        self.conf.write_text(f"""\
ClusterName=autoresearch-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={self.pid_files['slurmctld']}
SlurmdPidFile={self.pid_files['slurmd']}
SlurmctldLogFile={self.logs['slurmctld']}
SlurmdLogFile={self.logs['slurmd']}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
InactiveLimit=0
KillWait=2
MinJobAge=2
Waittime=0
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, name, argv):
        env = self.env()
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"{name} did not start ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()}\n{self.log_tail()}")
        self._wait(lambda: self._pid(name) is not None, 10, f"{name} wrote no pid file")

    def _pid(self, name):
        try:
            return int(self.pid_files[name].read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def _node_ready(self):
        result = subprocess.run([find_tool("sinfo"), "-h", "-N", "-o", "%T"], env=self.env(),
                                capture_output=True, text=True, timeout=30)
        return result.returncode == 0 and result.stdout.strip() == "idle"

    def _wait(self, cond, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Slurm test cluster: {what} within {timeout:.0f} s\n{self.log_tail()}")
