"""A real one-node SLURM cluster for the tests (Debian's slurmctld, slurmd, slurm-client and munge).

``slurm_cluster`` (session scope) starts munged as the munge user on a socket of its own, writes a
slurm.conf for this machine (its short host name, 2 CPUs, no cgroups), starts slurmctld and slurmd with
it, waits until ``sinfo`` shows the node idle, and sets ``SLURM_CONF`` for the clients (sbatch, srun,
squeue, scontrol) that the tests and submitit run. Every daemon is stopped by the pid in its pid file
when the session ends, also after a failure. Skips when the binaries are missing (.ci/run installs them).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    total_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    return total_kb // 1024 // 2  # at most what the machine has, or slurmd drains the node


def slurm_conf(folder: Path, host: str, munge_socket: Path) -> str:
    return f"""ClusterName=pytest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1
MinJobAge=2
KillWait=5
NodeName={host} CPUs=2 RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    def __init__(self, folder: Path, env: dict[str, str]):
        self.folder = folder
        self.env = env

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def wait_idle(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.split()
            if state and all(s == "idle" for s in state):
                return
            time.sleep(0.5)
        raise TimeoutError(f"the node never became idle: {self.run('sinfo', check=False).stdout}{self.logs()}")

    def logs(self) -> str:
        return "".join(p.read_text()[-2000:] for p in sorted(self.folder.glob("*.log")))


def _stop(pid_file: Path) -> None:
    """The daemon named by its pid file (the pid on its first line), by that pid: TERM, then KILL."""
    if not pid_file.is_file() or not pid_file.read_text().strip():
        return
    stop_pid(int(pid_file.read_text().split()[0]))


def stop_pid(pid: int) -> None:
    """TERM, then KILL if the process lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


@contextmanager
def one_node_cluster(folder: Path) -> Iterator[Cluster]:
    """munged, slurmctld and slurmd for ``folder``'s slurm.conf; ``SLURM_CONF`` set while it runs."""
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    munge_dir = Path("/run/munge")  # munged checks that its socket's folder belongs to munge
    munge = pwd.getpwnam("munge")
    munge_dir.mkdir(mode=0o755, exist_ok=True)
    os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
    tag = f"pytest-{os.getpid()}"  # a socket of its own: another munged may serve the default one
    munge_socket, munge_pid = munge_dir / f"{tag}.socket", munge_dir / f"{tag}.pid"
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, host, munge_socket))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    pid_files = [munge_pid, folder / "slurmctld.pid", folder / "slurmd.pid"]
    saved = os.environ.get("SLURM_CONF")
    cluster = None
    try:
        subprocess.run(
            ["runuser", "-u", "munge", "--", "munged", f"--socket={munge_socket}", f"--pid-file={munge_pid}",
             f"--log-file={munge_dir / tag}.log", f"--seed-file={munge_dir / tag}.seed"],
            check=True, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        subprocess.run(["slurmctld", "-c"], env=env, check=True, timeout=30)
        subprocess.run(["slurmd", "-N", host], env=env, check=True, timeout=30)
        cluster = Cluster(folder, env)
        cluster.wait_idle()
        os.environ["SLURM_CONF"] = str(conf)  # the clients that the code under test starts
        yield cluster
    finally:
        if cluster is not None:  # jobs still running would outlive slurmd in their slurmstepd
            cluster.run("scancel", "--user=root", check=False)
            time.sleep(1)
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        for pid_file in reversed(pid_files):
            _stop(pid_file)
        for leftover in munge_dir.glob(f"{tag}.*"):
            leftover.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[Cluster]:
    if missing := _missing():
        pytest.skip(f"SLURM/munge not installed ({', '.join(missing)}): apt-get install slurmctld slurmd munge")
    if os.geteuid() != 0:
        pytest.skip("the test cluster's daemons run as root (SlurmUser=root)")
    with one_node_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
