"""Fetching an archive: an HTTP download that resumes where it stopped, verified by its size and
sha256, and a zip extraction that cannot escape its folder (``download_and_extract``: both, retried
once for an unreadable archive). ``datamodules.download`` turns what is fetched into the seed's layout.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from email.message import Message
from pathlib import Path

from tqdm import tqdm

from core.atomic_io import fsync_dir, write_json_atomic
from core.errors import UserError

OFFLINE_HINT = (
    "point data.root at a folder laid out as ROOT/{train,validation,test}/<class>/<images>, "
    "or set data.url to a reachable copy of the archive (file:// works)"
)


class DownloadError(UserError, RuntimeError):
    """A download or preparation failure; the message is one line saying what to do."""


def _progress(total: int | None, desc: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False, disable=None)


def _size_file(part: Path) -> Path:
    """Beside ``<name>.part``: the archive's total size, so a complete part is recognised without a request."""
    return part.with_name(part.name + ".json")


def _recorded_size(part: Path) -> int | None:
    try:
        size = json.loads(_size_file(part).read_text())["size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return size if isinstance(size, int) and size >= 0 else None


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _size_file(part).unlink(missing_ok=True)


def _sha_ok(path: Path, sha256: str | None) -> bool:
    return sha256 is None or file_sha256(path) == sha256.lower()


def _finish(part: Path, dest: Path) -> Path:
    # The part keeps one fixed name so that a later process can resume it, hence a plain rename
    # (after an fsync) rather than atomic_target's per-process temporary file.
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    fsync_dir(dest.parent)
    _size_file(part).unlink(missing_ok=True)
    return dest


def _range_total(headers: Message) -> int | None:
    """The whole file's size from Content-Range (``bytes a-b/N`` on a 206, ``bytes */N`` on a 416)."""
    total = (headers.get("Content-Range") or "").rpartition("/")[2].strip()
    return int(total) if total.isdigit() else None


def _total_size(headers: Message, have: int) -> int | None:
    """The whole file's size: Content-Range's total, else offset + Content-Length."""
    if (total := _range_total(headers)) is not None:
        return total
    length = headers.get("Content-Length")
    return have + int(length) if length is not None and length.strip().isdigit() else None


def _transfer(url: str, part: Path, have: int, expected: int | None, timeout: float) -> int | None:
    """Append to (or, if the server ignores Range, rewrite) ``part``; returns the total size when known."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if have and getattr(response, "status", 200) != 206:  # the server ignored Range: start over
            have = 0
        total = _total_size(response.headers, have)
        if have and None not in (total, expected) and total != expected:
            _discard(part)  # the server's file is not the one this part began as
            raise DownloadError(f"the file changed size on the server ({expected} -> {total} bytes)")
        if total is not None and total != expected:
            write_json_atomic(_size_file(part), {"size": total})
        with open(part, "ab" if have else "wb") as f, _progress(total, part.stem) as bar:
            bar.update(have)
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    return total


def download(url: str, dest: Path, sha256: str | None = None, attempts: int = 4, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` with a progress bar. A broken transfer is resumed from where it
    stopped (HTTP Range) on the next attempt, or on the next call; the size is checked against
    Content-Length, and ``sha256`` when given. A mismatch deletes the file and raises.

    The total size is recorded beside ``<dest>.part`` as soon as it is known, so a part that is
    already complete (a kill before the final rename) is verified and finished without a request:
    re-requesting it would get HTTP 416 on every run. A 416 is handled the same way: the part is
    finished if its size (or sha256) proves it complete, else deleted and fetched again."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if dest.is_file():
        _verify(dest, sha256)
        return dest
    last_error: Exception | None = None
    for attempt in range(attempts):
        have = part.stat().st_size if part.is_file() else 0
        expected = _recorded_size(part)
        if have and expected is not None and have >= expected:
            if have == expected and _sha_ok(part, sha256):
                return _finish(part, dest)
            _discard(part)  # longer than the file, or not its bytes: start over
            have = 0
        try:
            total = _transfer(url, part, have, expected, timeout)
        except urllib.error.HTTPError as err:
            last_error = err
            if err.code == 416 and have:  # nothing left to send: the part may already be complete
                known = expected if expected is not None else _range_total(err.headers)
                provable = known == have if known is not None else sha256 is not None
                if provable and _sha_ok(part, sha256):
                    return _finish(part, dest)
                _discard(part)
                continue  # start over at once: the server is reachable
        except (DownloadError, urllib.error.URLError, OSError, http.client.HTTPException) as err:
            last_error = err  # includes a connection cut mid-transfer (IncompleteRead)
        else:
            size = part.stat().st_size
            if total is None or size == total:
                got = file_sha256(part) if sha256 is not None else None
                if got is not None and got != sha256.lower():
                    _discard(part)  # a wrong archive is not retried: the pinned checksum decides
                    raise DownloadError(
                        f"checksum mismatch for {dest.name}: expected sha256 {sha256}, got {got}; file deleted"
                    )
                return _finish(part, dest)
            last_error = DownloadError(f"incomplete: {size} of {total} bytes")
        time.sleep(min(0.2 * 2**attempt, 5.0))
    reason = getattr(last_error, "reason", last_error)
    raise DownloadError(f"could not download {url} ({reason}); {OFFLINE_HINT}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, sha256: str | None) -> None:
    if sha256 is None:
        return
    got = file_sha256(path)
    if got != sha256.lower():
        path.unlink(missing_ok=True)
        raise DownloadError(f"checksum mismatch for {path.name}: expected sha256 {sha256}, got {got}; file deleted")


def extract_zip(archive: Path, target: Path) -> Path:
    """Extract ``archive`` into ``target`` (members may not escape it)."""
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        root = target.resolve()
        for member in zf.infolist():
            if not (root / member.filename).resolve().is_relative_to(root):
                raise DownloadError(f"{archive.name}: member {member.filename!r} escapes the target folder")
        zf.extractall(target)
    return target


def download_and_extract(url: str, dest: Path, sha256: str | None, extracted: Path) -> None:
    """The archive, extracted into ``extracted``. An archive that cannot be read as a zip (a
    truncated file, an error page saved under its name) is deleted with any partial extraction
    and fetched once more, so it cannot block every later run."""
    scratch = extracted.with_name(extracted.name + ".tmp")
    for attempt in range(2):
        archive = download(url, dest, sha256)
        shutil.rmtree(scratch, ignore_errors=True)  # a killed extraction's leftovers
        try:
            extract_zip(archive, scratch)
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            shutil.rmtree(scratch, ignore_errors=True)
            archive.unlink(missing_ok=True)
            if attempt:
                raise DownloadError(
                    f"{dest.name} from {url} is not a readable zip archive ({err}), also when downloaded again; "
                    "check data.url (the file was deleted)"
                ) from None
            continue
        os.replace(scratch, extracted)  # a whole folder: present means fully extracted
        return
