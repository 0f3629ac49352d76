"""Files written whole or not at all, by any number of processes at once.

Every writer of the project goes through ``atomic_target``: the bytes go to a temporary name that
is unique to the process (pid and a random suffix, in the target's folder), are fsync'ed, renamed
over the target, and the folder is fsync'ed, so a crash or a power loss leaves the old file or the
new one, never an empty or half-written one, and two writers never share a temporary file. A full
disk (or a file-size limit) is one ``DiskFullError`` line naming the folder and the space needed,
and the temporary file is removed. ``file_lock`` serialises builders of one shared cache file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.errors import FULL_DISK as _FULL
from core.errors import ConfigError, DiskFullError, first_line, os_error_line


def temp_path(path: str | os.PathLike) -> Path:
    """A hidden temporary name beside ``path``, unique to this process and call."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def disk_full(err: OSError, path: Path, needed: int | None = None) -> DiskFullError:
    """The one-line error for a write into ``path`` that failed with ``err`` (ENOSPC and kin)."""
    folder = path.parent
    try:
        free = _size(shutil.disk_usage(folder).free)
    except OSError:
        free = "unknown"
    what = "the file-size limit (ulimit -f)" if err.errno == errno.EFBIG else f"no space left ({free} free)"
    return DiskFullError(
        f"cannot write {path.name} in {folder}: {what}; "
        + (f"it needs about {_size(needed)}" if needed else "it needs more than that")
        + "; free some space or point the run at another folder (out_dir=, data.cache_dir=)"
    )


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike, needed: int | None = None) -> Iterator[Path]:
    """Yields a temporary path to write; on success it becomes ``path`` (fsync'ed, renamed, folder
    fsync'ed); on any failure it is removed, and a full disk becomes ``DiskFullError``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        if err.errno in _FULL and not isinstance(err, DiskFullError):
            raise disk_full(err, path, needed) from None
        raise
    finally:
        with contextlib.suppress(OSError):  # a folder gone read-only: the first error is the one to tell
            tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Before the work that fills it: ``folder`` (``what``, as the user named it) exists or can be
    made, and this process can create a file in it; otherwise one ``ConfigError`` line."""
    folder = Path(folder)
    probe = temp_path(folder / "write-check")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write in {what}: {os_error_line(err, with_file=False)}") from None


def preallocate(fd: int, size: int, path: Path) -> None:
    """Reserve ``size`` bytes for a file that is then written through a memory map: without it a
    full disk is a SIGBUS in the middle of the copy instead of an error here."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno in _FULL:
            raise disk_full(err, path, size) from None
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without fallocate: go on
            raise


def raise_if_full(tmp: Path, path: Path, needed: int | None = None) -> None:
    """After a writer that hides errno failed on ``tmp`` (torch.save's C++ writer raises a bare
    RuntimeError), ask the file system: reserving 1 MiB more at the end of the partial file fails
    with ENOSPC or EFBIG exactly when a full disk or the file-size limit is what stopped it."""
    try:
        fd = os.open(tmp, os.O_WRONLY)
    except OSError:
        return
    try:
        os.posix_fallocate(fd, os.fstat(fd).st_size, 1 << 20)
    except OSError as err:
        if err.errno in _FULL:
            raise disk_full(err, path, needed) from None
    finally:
        os.close(fd)


def payload_bytes(obj: Any) -> int:
    """The bytes of every tensor or array in a nested dict/list: about what ``torch.save`` writes."""
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    nbytes = getattr(obj, "nbytes", None)
    return nbytes if isinstance(nbytes, int) else 0


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through ``atomic_target``; a full disk is ``DiskFullError`` with the size needed."""
    import torch  # here, not at the top: most importers of this module never save tensors

    path = Path(path)
    needed = payload_bytes(obj) or None
    with atomic_target(path, needed) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:
            raise_if_full(tmp, path, needed)
            # its C++ writer (a std::ofstream) hides the errno: "file write failed", "basic_ios::clear: iostream error"
            if any(word in str(err) for word in ("PytorchStreamWriter", "write", "iostream")):
                raise OSError(errno.EIO, f"writing failed ({first_line(err, 120)})", str(path)) from None
            raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_target(path, len(data)) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text; file names that are not valid UTF-8 (surrogate escapes) keep their original bytes."""
    write_bytes_atomic(path, text.encode("utf-8", errors="surrogateescape"))


def finite_json(data: Any, where: str = "") -> tuple[Any, list[str]]:
    """``data`` with every NaN or infinity replaced by ``None``, and the dotted keys that were."""
    if isinstance(data, float) and not math.isfinite(data):
        return None, [where or "(value)"]
    if isinstance(data, dict):
        out, found = {}, []
        for key, value in data.items():
            out[key], more = finite_json(value, f"{where}.{key}" if where else str(key))
            found += more
        return out, found
    if isinstance(data, (list, tuple)):
        items = [finite_json(v, f"{where}[{i}]") for i, v in enumerate(data)]
        return [v for v, _ in items], [k for _, keys in items for k in keys]
    return data, []


def json_text(data: Any) -> str:
    """Strict JSON (``allow_nan=False``): a non-finite number becomes ``null``, and a top-level
    ``"non_finite"`` list names where that happened, so a reader never meets ``NaN``."""
    clean, found = finite_json(data)
    if found and isinstance(clean, dict):
        clean["non_finite"] = found
    return json.dumps(clean, indent=2, allow_nan=False) + "\n"


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json_text(data))


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on ``<path>.lock`` (``flock``: released by the kernel if the holder dies),
    so one process builds a shared file while the others wait and then read it."""
    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
