"""States an interrupted or damaged download used to be stuck in, and how the next run leaves them."""

from __future__ import annotations

import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_download import ARCHIVE, file_sha256_bytes

import datamodules.download as dl
from core.errors import UserError
from datamodules.data_index import scan_splits
from datamodules.download import prepare_dataset
from datamodules.fetch import DownloadError, download

NAME = "kagglecatsanddogs_5340.zip"
SHA = file_sha256_bytes(ARCHIVE)
NOT_A_ZIP = b"<html>503 Service Unavailable</html>"


class Killed(BaseException):
    """A stand-in for SIGKILL: nothing catches it, so no cleanup runs."""


class Handler(BaseHTTPRequestHandler):
    """Serves ARCHIVE with Range support and a real server's 416 past the end. ``bodies`` are served
    instead, one per request, while there are any; ``range_total=False`` leaves Content-Range off a 416."""

    ranges: list[str | None] = []
    bodies: list[bytes] = []
    range_total = True

    def do_GET(self):  # noqa: N802 - http.server's naming
        Handler.ranges.append(self.headers.get("Range"))
        data = Handler.bodies.pop(0) if Handler.bodies else ARCHIVE
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        if start >= len(data) > 0:
            self.send_response(416)
            if Handler.range_total:
                self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def url():
    Handler.ranges, Handler.bodies, Handler.range_total = [], [], True
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/{NAME}"
    httpd.shutdown()
    httpd.server_close()


def _no_leftovers(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == [NAME]


# --- a. a complete .part ---------------------------------------------------------------------


@pytest.mark.parametrize("sha256", [None, SHA], ids=["size", "sha256"])
def test_a_complete_part_is_verified_and_finished_without_a_request(url, tmp_path, monkeypatch, sha256):
    dest = tmp_path / NAME
    real_replace = os.replace

    def killed_before_the_rename(src, dst):
        if str(src).endswith(".part"):
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_rename)
    with pytest.raises(Killed):
        download(url, dest, sha256)
    monkeypatch.setattr(os, "replace", real_replace)
    part = tmp_path / f"{NAME}.part"
    assert part.read_bytes() == ARCHIVE and json.loads((tmp_path / f"{NAME}.part.json").read_text()) == {
        "size": len(ARCHIVE)
    }
    assert download(url, dest, sha256) == dest
    assert Handler.ranges == [None]  # the first run's request only: a Range request would get 416
    assert dest.read_bytes() == ARCHIVE
    _no_leftovers(tmp_path)


def test_a_recorded_complete_part_with_the_wrong_bytes_is_fetched_again(url, tmp_path):
    (tmp_path / f"{NAME}.part").write_bytes(b"x" * len(ARCHIVE))
    (tmp_path / f"{NAME}.part.json").write_text(json.dumps({"size": len(ARCHIVE)}))
    download(url, tmp_path / NAME, SHA)
    assert Handler.ranges == [None]
    assert (tmp_path / NAME).read_bytes() == ARCHIVE
    _no_leftovers(tmp_path)


@pytest.mark.parametrize(("range_total", "sha256"), [(True, None), (False, SHA)], ids=["content-range", "sha256"])
def test_416_finishes_a_part_that_proves_complete(url, tmp_path, range_total, sha256):
    Handler.range_total = range_total
    (tmp_path / f"{NAME}.part").write_bytes(ARCHIVE)  # no size record: e.g. left by an older version
    download(url, tmp_path / NAME, sha256)
    assert Handler.ranges == [f"bytes={len(ARCHIVE)}-"]
    assert (tmp_path / NAME).read_bytes() == ARCHIVE
    _no_leftovers(tmp_path)


@pytest.mark.parametrize(
    ("part", "range_total", "sha256"),
    [(ARCHIVE + b"tail", True, None), (ARCHIVE, False, None), (b"y" * len(ARCHIVE), True, SHA)],
    ids=["too-long", "unprovable", "wrong-bytes"],
)
def test_416_with_a_part_that_is_not_proven_complete_starts_over(url, tmp_path, part, range_total, sha256):
    Handler.range_total = range_total
    (tmp_path / f"{NAME}.part").write_bytes(part)
    download(url, tmp_path / NAME, sha256)
    assert Handler.ranges == [f"bytes={len(part)}-", None]
    assert (tmp_path / NAME).read_bytes() == ARCHIVE
    _no_leftovers(tmp_path)


# --- b. a corrupt archive --------------------------------------------------------------------


def _prepare(root: Path, url: str, sha256: str | None = None) -> None:
    prepare_dataset(root, "kaggle_cats_vs_dogs", url, sha256, [5, 3, 3], 1, log=lambda msg: None)


def _damaged() -> bytes:
    """The archive with one byte of the first member's data changed: it opens, its CRC check fails."""
    data = bytearray(ARCHIVE)
    data[200] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("where", ["on-disk", "served-not-a-zip", "served-bad-crc"])
def test_a_corrupt_archive_is_deleted_and_fetched_again(url, tmp_path, where):
    root = tmp_path / "data"
    if where == "on-disk":  # left by an earlier run, with a killed extraction beside it
        (root / "_download" / "extracted.tmp" / "PetImages").mkdir(parents=True)
        (root / "_download" / "extracted.tmp" / "PetImages" / "stale.jpg").write_bytes(b"stale")
        (root / "_download" / NAME).write_bytes(NOT_A_ZIP)
    else:
        Handler.bodies = [NOT_A_ZIP if where == "served-not-a-zip" else _damaged()]
    _prepare(root, url)
    assert Handler.ranges == ([None] if where == "on-disk" else [None, None])
    assert (root / "_download" / NAME).read_bytes() == ARCHIVE
    assert not list(root.glob("_download/extracted/**/stale.jpg"))
    assert scan_splits(root).counts() == {"train": 10, "val": 6, "test": 6}


def test_an_archive_corrupt_twice_is_one_line(url, tmp_path):
    root = tmp_path / "data"
    Handler.bodies = [NOT_A_ZIP, NOT_A_ZIP]
    with pytest.raises(DownloadError, match=r"is not a readable zip archive .*also when downloaded again") as err:
        _prepare(root, url)
    assert "\n" not in str(err.value) and isinstance(err.value, UserError) and err.value.exit_code == 2
    assert len(Handler.ranges) == 2  # fetched again once, not forever
    assert not (root / "_download" / NAME).exists() and not (root / "_download" / "extracted.tmp").exists()
    assert not (root / "train").exists()


# --- c. a carve killed part way ----------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file the carve owns (paths relative to root; the root itself spelled ROOT)."""
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith("_download/"):
            files[rel] = path.read_bytes().replace(str(root).encode(), b"ROOT")
    return files


def _kill_carve(monkeypatch, root: Path, where: str) -> None:
    real_replace, real_copy, copies = os.replace, shutil.copyfile, []

    def replace(src, dst):
        src, dst = Path(src), Path(dst)
        moving = {"between-renames-1": "validation", "between-renames-2": "test"}.get(where)
        if (moving and src == root / dl.STAGING / moving) or (
            where == "before-manifest" and dst == root / "manifest.csv"
        ):
            raise Killed
        real_replace(src, dst)

    def copyfile(src, dst, **kwargs):
        copies.append(dst)
        if where == "while-staging" and len(copies) == 7:
            raise Killed
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "copyfile", copyfile)


@pytest.mark.parametrize("where", ["while-staging", "between-renames-1", "between-renames-2", "before-manifest"])
def test_a_killed_carve_is_finished_like_an_uninterrupted_run(tmp_path, monkeypatch, where):
    source = tmp_path / NAME
    source.write_bytes(ARCHIVE)
    reference, root = tmp_path / "reference", tmp_path / "data"
    _prepare(reference, source.as_uri())
    with monkeypatch.context() as patch:
        _kill_carve(patch, root, where)
        with pytest.raises(Killed):
            _prepare(root, source.as_uri())
    moved = {"while-staging": [], "between-renames-1": ["train"], "between-renames-2": ["train", "validation"]}
    assert [split for split in dl.SPLITS if (root / split).is_dir()] == moved.get(where, list(dl.SPLITS))
    assert not (root / "manifest.csv").exists() and dl.carve_interrupted(root)
    _prepare(root, source.as_uri())
    assert _snapshot(root) == _snapshot(reference)
    assert not (root / dl.STAGING).exists() and dl.carve_state(root) == "done"


def test_a_carve_interrupted_by_an_older_version_is_redone(tmp_path):
    """The old carve renamed train/ before anything recorded its plan: only a redo can finish it."""
    source = tmp_path / NAME
    source.write_bytes(ARCHIVE)
    reference, root = tmp_path / "reference", tmp_path / "data"
    _prepare(reference, source.as_uri())
    _prepare(root, source.as_uri())
    (root / dl.STAGING).mkdir()
    for split in ("validation", "test"):
        os.replace(root / split, root / dl.STAGING / split)
    for name in ("manifest.csv", "bad_files.tsv", "near_duplicates.tsv"):
        (root / name).unlink()
    _prepare(root, source.as_uri())
    assert _snapshot(root) == _snapshot(reference)


def test_split_folders_without_a_staging_area_are_never_downloaded_into(tmp_path):
    root = tmp_path / "mine"
    (root / "validation" / "cats").mkdir(parents=True)
    (root / "validation" / "cats" / "a.jpg").write_bytes(b"mine")
    _prepare(root, "http://127.0.0.1:9/unreachable.zip")  # nothing requested, nothing written
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
        "validation",
        "validation/cats",
        "validation/cats/a.jpg",
    ]
