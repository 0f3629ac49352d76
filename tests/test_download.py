"""The default data set's download, cleaning and split, against archives served on 127.0.0.1."""

from __future__ import annotations

import csv
import io
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from datamodules.data_index import scan_splits
from datamodules.download import prepare_dataset
from datamodules.fetch import DownloadError, file_sha256

from conftest import fast_args
from helpers import run_train

PER_CLASS = 14


def _jpeg(rng, colour) -> bytes:
    pixels = np.clip(np.array(colour) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def build_archive() -> tuple[bytes, dict[str, str]]:
    """Microsoft's inner layout with its blemishes: a zero-byte file, a non-JPEG, Thumbs.db and an
    exact duplicate. Returns the zip bytes and the blemished members' names."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for folder, colour in (("Cat", (200, 40, 40)), ("Dog", (40, 60, 200))):
            for i in range(PER_CLASS):
                zf.writestr(f"PetImages/{folder}/{i}.jpg", _jpeg(rng, colour))
        zf.writestr("PetImages/Cat/666.jpg", b"")
        zf.writestr("PetImages/Dog/11702.jpg", b"GIF89a not really an image")
        zf.writestr("PetImages/Dog/Thumbs.db", b"\xd0\xcf\x11\xe0")
        zf.writestr("PetImages/Cat/100.jpg", zf.read("PetImages/Cat/3.jpg"))  # exact duplicate
    return buffer.getvalue(), {"zero": "Cat/666.jpg", "not_jpeg": "Dog/11702.jpg", "thumbs": "Dog/Thumbs.db"}


ARCHIVE, BLEMISHES = build_archive()


class Handler(BaseHTTPRequestHandler):
    """Serves ARCHIVE with Range support; with ``cut_next`` set it sends half and drops the line."""

    cut_next = False
    ranges: list[str | None] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        Handler.ranges.append(self.headers.get("Range"))
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        body = ARCHIVE[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(ARCHIVE) - 1}/{len(ARCHIVE)}")
        self.end_headers()
        if Handler.cut_next:
            Handler.cut_next = False
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Handler.ranges, Handler.cut_next = [], False
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/kagglecatsanddogs_5340.zip"
    httpd.shutdown()
    httpd.server_close()


def _prepare(root: Path, url: str, seed: int = 1, sha256: str | None = None, sizes=(5, 3, 3)) -> None:
    prepare_dataset(root, "kaggle_cats_vs_dogs", url, sha256, list(sizes), seed, log=lambda msg: None)


def _manifest(root: Path) -> list[dict[str, str]]:
    with open(root / "manifest.csv") as f:
        return list(csv.DictReader(f))


def test_download_clean_and_split(server, tmp_path):
    root = tmp_path / "data"
    _prepare(root, server, sha256=file_sha256_bytes(ARCHIVE))
    index = scan_splits(root)
    assert index.classes == ["cats", "dogs"]
    assert index.counts() == {"train": 10, "val": 6, "test": 6}
    rows = _manifest(root)
    assert len(rows) == 22 and {r["split"] for r in rows} == {"train", "validation", "test"}
    hashes = [r["sha256"] for r in rows]
    assert len(set(hashes)) == len(hashes)  # no picture twice, so never in two splits
    assert all(file_sha256(root / r["file"]) == r["sha256"] for r in rows)
    bad = (root / "bad_files.tsv").read_text()
    for member in BLEMISHES.values():
        assert member in bad
    # the duplicate pair: at most one of the two identical files was used
    duplicate = file_sha256(next(root.glob("_download/extracted/PetImages/Cat/3.jpg")))
    assert hashes.count(duplicate) <= 1


def file_sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_interrupted_download_resumes(server, tmp_path):
    Handler.cut_next = True
    _prepare(tmp_path / "data", server)
    assert Handler.ranges[0] is None
    resumed_from = int(Handler.ranges[1].split("=")[1].rstrip("-"))
    assert 0 < resumed_from < len(ARCHIVE)  # the second request continued, it did not start over
    archive = tmp_path / "data" / "_download" / "kagglecatsanddogs_5340.zip"
    assert archive.read_bytes() == ARCHIVE


def test_checksum_mismatch_is_refused(server, tmp_path):
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        _prepare(root, server, sha256="0" * 64)
    assert not (root / "train").exists()
    assert not list((root / "_download").glob("*.zip*"))  # the bad archive is gone


def test_same_seed_same_manifest_other_seed_other_split(server, tmp_path):
    _prepare(tmp_path / "a", server, seed=1)
    _prepare(tmp_path / "b", server, seed=1)
    _prepare(tmp_path / "c", server, seed=2)
    a, b, c = (_manifest(tmp_path / n) for n in "abc")
    assert a == b
    assert [(r["sha256"], r["split"]) for r in a] != [(r["sha256"], r["split"]) for r in c]


def test_split_sizes_larger_than_the_clean_images_are_an_error(server, tmp_path):
    with pytest.raises(DownloadError, match="fewer than data.split_sizes"):
        _prepare(tmp_path / "data", server, sizes=(10, 3, 3))


def test_file_url_works(tmp_path):
    archive = tmp_path / "copy.zip"
    archive.write_bytes(ARCHIVE)
    _prepare(tmp_path / "data", archive.as_uri())
    assert scan_splits(tmp_path / "data").counts()["train"] == 10


def test_unreachable_server_is_one_clear_line(capsys, toy_root, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = fast_args(
        tmp_path / "nothing_here",
        tmp_path,
        **{"data.source": "kaggle_cats_vs_dogs", "data.url": f"http://127.0.0.1:{port}/x.zip"},
    )
    with pytest.raises(SystemExit) as exc:
        train.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not download" in err[0] and "point data.root at a folder" in err[0]


def test_train_py_downloads_when_data_root_is_empty(server, tmp_path):
    args = fast_args(
        tmp_path / "fresh",
        tmp_path / "runs",
        stage="features",
        **{
            "data.source": "kaggle_cats_vs_dogs",
            "data.url": server,
            "data.split_sizes": "[6,4,4]",
            "trainer.max_epochs": "5",
        },
    )
    metrics = run_train(args)
    assert metrics["test"]["count"] == 8 and metrics["val"]["count"] == 8
    assert metrics["test"]["acc"] >= 0.75


def test_oxford_pets_carving(tmp_path, monkeypatch):
    """The torchvision downloader is replaced by a stand-in with the same attributes."""
    import torchvision.datasets

    rng = np.random.default_rng(1)
    images = tmp_path / "oxford"
    images.mkdir()
    paths, breeds = [], []
    for i in range(24):
        path = images / f"pet{i}.jpg"
        path.write_bytes(_jpeg(rng, (i * 10 % 255, 80, 80)))
        paths.append(path)
        breeds.append(i % 3)

    class FakePets:
        classes = ["Abyssinian", "Bengal", "Basset Hound"]

        def __init__(self, root, split, download, target_types):
            assert download
            half = slice(0, 12) if split == "trainval" else slice(12, 24)
            self._images = paths[half]
            self._labels = breeds[half]
            self._bin_labels = [0 if b < 2 else 1 for b in breeds[half]]

    monkeypatch.setattr(torchvision.datasets, "OxfordIIITPet", FakePets)
    prepare_dataset(tmp_path / "binary", "oxford_pets", None, None, [2, 1, 1], 0, log=lambda m: None)
    assert scan_splits(tmp_path / "binary").classes == ["cats", "dogs"]
    prepare_dataset(tmp_path / "breeds", "oxford_pets_breeds", None, None, [4, 2, 2], 0, log=lambda m: None)
    assert scan_splits(tmp_path / "breeds").classes == ["Abyssinian", "Basset_Hound", "Bengal"]
