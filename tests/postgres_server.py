"""A real PostgreSQL server on loopback for the tests (Debian's ``postgresql`` package).

``postgres_url`` (session scope) runs ``initdb`` and ``pg_ctl start`` as the ``postgres`` user in a fresh
folder of its own (PostgreSQL refuses to run as root), on a free port of 127.0.0.1 with trust
authentication, and yields a SQLAlchemy URL for its ``postgres`` database. The server is stopped by the pid
in its ``postmaster.pid`` when the session ends, also after a failure, and the folder is removed. Skips
when the binaries are missing (.ci/run installs them).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import _free_port, stop_pid

BIN = Path("/usr/lib/postgresql")


def _binaries() -> Path | None:
    versions = sorted(BIN.glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    return versions[-1].parent if versions else None


def _shut_down(pid_file: Path) -> None:
    """PostgreSQL's fast shutdown (SIGINT to the postmaster, by the pid on the pid file's first line:
    SIGTERM would wait for the test process's pooled connections), then TERM and KILL if it lingers."""
    if not pid_file.is_file():
        return
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    for _ in range(100):
        if not pid_file.exists():
            return
        time.sleep(0.1)
    stop_pid(pid)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    bin_dir = _binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed: apt-get install postgresql")
    if os.geteuid() != 0:
        pytest.skip("the test server is started as the postgres user (needs root to switch)")
    user = pwd.getpwnam("postgres")
    folder = Path(tempfile.mkdtemp(prefix="pytest-postgres-"))  # outside pytest's root-only tmp folders
    os.chown(folder, user.pw_uid, user.pw_gid)
    data, port = folder / "data", _free_port()

    def as_postgres(*args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, timeout=120)

    try:
        as_postgres(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        as_postgres(str(bin_dir / "pg_ctl"), "start", "-w", "-D", str(data), "-l", str(folder / "log"), "-o", options)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        _shut_down(data / "postmaster.pid")
        shutil.rmtree(folder, ignore_errors=True)
