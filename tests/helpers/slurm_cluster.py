"""A real single-node SLURM on this machine, for tests: munged, slurmctld and slurmd, each started
here with its state, logs, pid files and socket in a temporary folder, and stopped by those pid files
(never by name). `SLURM_CONF` points the client commands (sbatch, squeue, scontrol, scancel) at it.

- Needs root (the daemons run as root, munged as the munge user). Missing packages are installed
  with apt-get (`apt-get update` + `apt-get install -y --no-install-recommends slurmctld slurmd
  slurm-client munge`). Without root, `SlurmUnavailable` is raised (the tests skip); a failed install
  or daemon start as root raises RuntimeError (the tests fail).
- Its own munged (own socket, so a munged already running on the machine is left alone), its own
  free ports for slurmctld/slurmd, and settings that make requeue fast: AuthInfo cred_expire=10
  (a requeued job can start again after ~10 s instead of ~2 min), sched_interval=2.
- The node gets CPUs=max(nproc, 2) (SlurmdParameters=config_overrides), so a two-process job also
  fits on a one-CPU CI machine.
- Cleanup: `stop()` runs from the caller's `finally`/fixture teardown and again at interpreter exit
  (atexit; it is idempotent). A session killed outright (SIGKILL, os._exit) cannot clean up, so the
  folder records its owner's pid (`owner.pid`) and the next `start()` stops the daemons of folders
  whose owner is gone (`reap_stale`), by their pid files, and only when the process's command line
  names that folder (a recycled pid is left alone).

Use: `with LocalSlurm() as cluster: ...` or `cluster = LocalSlurm(); cluster.start(); ... cluster.stop()`.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
CLIENTS = ["sbatch", "sinfo", "scontrol", "squeue", "scancel", "srun"]


class SlurmUnavailable(RuntimeError):
    """This machine cannot run the local cluster: not root (tests skip). Install or daemon failures
    as root raise RuntimeError instead (tests fail)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or (BINARIES.get(name) if Path(BINARIES.get(name, "/nonexistent")).exists() else None)


def missing_binaries() -> list[str]:
    return [name for name in [*BINARIES, *CLIENTS] if _which(name) is None]


def ensure_installed() -> None:
    """Install munge and SLURM with apt-get when absent (root only)."""
    missing = missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"local SLURM needs {', '.join(missing)}; installing them needs root")
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"local SLURM needs {', '.join(missing)} and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{' '.join(cmd)} failed: {' / '.join(tail)}")
    still = missing_binaries()
    if still:
        raise RuntimeError(f"after apt-get install still missing: {', '.join(still)}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _real_memory_mb() -> int:
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"RealMemory=(\d+)", out)
    return int(match.group(1)) if match else 1024


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _terminate(pid: int, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL after `timeout` s."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


ROOT_PREFIX = "fadscale-slurm-"
DAEMON_PID_FILES = ("slurmd.pid", "slurmctld.pid", "munge/munged.pid")  # stop order: newest first


def reap_stale(tmp: str | Path | None = None) -> list[Path]:
    """Stop the daemons of test clusters whose owning process is gone (a test session that was
    killed before its teardown), then remove their folders. Returns the folders reaped."""
    reaped = []
    for root in sorted(Path(tmp or tempfile.gettempdir()).glob(f"{ROOT_PREFIX}*")):
        owner = _read_pid(root / "owner.pid")
        if owner is None or _alive(owner):
            continue  # a folder of a live session, or not ours
        ctld = _read_pid(root / "slurmctld.pid")
        if ctld and _alive(ctld) and str(root) in _cmdline(ctld) and _which("scancel"):
            # Its jobs first: their processes live under slurmstepd, not under the daemons.
            env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
            try:
                jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env,
                                      timeout=10).stdout.split()
                if jobs:
                    subprocess.run(["scancel", *jobs], capture_output=True, env=env, timeout=10)
                    time.sleep(5)  # KillWait: the steps get SIGTERM, then SIGKILL
            except (OSError, subprocess.SubprocessError):
                pass
        for name in DAEMON_PID_FILES:
            pid = _read_pid(root / name)
            if pid and _alive(pid) and str(root) in _cmdline(pid):
                _terminate(pid)
        shutil.rmtree(root, ignore_errors=True)
        reaped.append(root)
    return reaped


class LocalSlurm:
    def __init__(self, root: str | Path | None = None):
        self._own_root = root is None
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix=ROOT_PREFIX))
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.cpus = max(os.cpu_count() or 1, 2)
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.pid_files = {
            "slurmd": self.root / "slurmd.pid",
            "slurmctld": self.root / "slurmctld.pid",
            "munged": self.munge_dir / "munged.pid",
        }
        self._env_set = False
        self._env_before: str | None = None
        self.started: list[str] = []

    # ---------------------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def write_conf(self) -> None:
        r = self.root
        lines = [
            "ClusterName=fadscale-test",
            f"SlurmctldHost={self.host}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerParameters=sched_interval=2",
            "SlurmdParameters=config_overrides",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "MinJobAge=600",
            "KillWait=5",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={self.pid_files['slurmd']}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd.log'}",
            f"NodeName={self.host} CPUs={self.cpus} RealMemory={_real_memory_mb()} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        (r / "state").mkdir(parents=True, exist_ok=True)
        (r / "spool").mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join(lines) + "\n")

    # ---------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "LocalSlurm":
        if os.geteuid() != 0:
            raise SlurmUnavailable("the local SLURM test cluster needs root (daemons run as root)")
        ensure_installed()
        if self._own_root:
            reap_stale(self.root.parent)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # the munge user must reach its folder inside
        (self.root / "owner.pid").write_text(f"{os.getpid()}\n")
        self.write_conf()
        atexit.register(self.stop)
        try:
            self._start_munged()
            self._start("slurmctld", [_which("slurmctld"), "-f", str(self.conf)])
            self._start("slurmd", [_which("slurmd"), "-f", str(self.conf)])
            self._env_before = os.environ.get("SLURM_CONF")
            self._env_set = True
            os.environ["SLURM_CONF"] = str(self.conf)
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munged(self) -> None:
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=True, timeout=60)
        self.munge_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.munge_dir, "munge", "munge")
        os.chmod(self.munge_dir, 0o755)
        cmd = [
            "runuser", "-u", "munge", "--", _which("munged"),
            f"--socket={self.munge_socket}",
            f"--pid-file={self.pid_files['munged']}",
            f"--log-file={self.munge_dir / 'munged.log'}",
            f"--seed-file={self.munge_dir / 'munged.seed'}",
        ]  # fmt: skip
        self._start("munged", cmd)

    def _start(self, name: str, cmd: list[str], timeout: float = 20) -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} did not start ({proc.returncode}): {proc.stderr.strip()}{self._logs()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = _read_pid(self.pid_files[name])
            if pid and _alive(pid):
                self.started.append(name)
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} wrote no live pid to {self.pid_files[name]}{self._logs()}")

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            proc = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
            state = proc.stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"node not idle after {timeout} s (state {state!r}){self._logs()}")

    def _logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.log"):
            path = self.root / name
            if path.exists():
                tail = path.read_text(errors="replace").strip().splitlines()[-5:]
                parts.append(f"\n--- {name}:\n" + "\n".join(tail))
        return "".join(parts)

    def stop(self) -> None:
        """Cancel what is still queued, then stop the daemons this object started (by their pid
        files), newest first."""
        if "slurmctld" in self.started:
            try:
                jobs = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
                if jobs:
                    self.run("scancel", *jobs, check=False, timeout=10)
                    deadline = time.monotonic() + 15
                    while time.monotonic() < deadline and self.run(
                        "squeue", "-h", "-o", "%i", check=False, timeout=10
                    ).stdout.strip():
                        time.sleep(0.5)
            except (OSError, subprocess.SubprocessError):
                pass
        for name in reversed(self.started):
            pid = _read_pid(self.pid_files[name])
            if pid and _alive(pid):
                _terminate(pid)
        self.started.clear()
        atexit.unregister(self.stop)
        if self._env_set:
            if self._env_before is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = self._env_before
            self._env_set = False
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------------------
    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, ...); {} when unknown."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False, timeout=10)
        if proc.returncode != 0:
            return {}
        info = {}
        for token in proc.stdout.split():
            key, sep, value = token.partition("=")
            if sep and key not in info:
                info[key] = value
        return info
