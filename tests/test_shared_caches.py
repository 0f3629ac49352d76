"""Caches shared by several processes, and a full disk (issue 17).

Two processes started at the same instant on one cache folder: one builds, the other waits for the
lock and reads the finished file. A full disk (simulated, and a real file-size limit) is one
``DiskFullError`` line naming the folder, with no temporary file left behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.errors import DiskFullError
from datamodules import decoded_cache as decoded_module
from datamodules import feature_cache
from datamodules.data_index import scan_splits
from datamodules.decoded_cache import cached_size, decoded_cache, open_decoded
from datamodules.feature_cache import FeatureDataModule
from datamodules.image_folder import ImageFolderDataModule
from lightning_modules.run_safety import AtomicCheckpointIO

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SIZE = 24
CHILD = "import sys, test_shared_caches as t; t.child(*sys.argv[1:])"


class TinyBackbone(nn.Module):
    name, version = "tiny", 1

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():  # the same weights in every process, the caller's RNG untouched
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TinyModel(nn.Module):
    """What FeatureDataModule needs of a classifier: ``backbone`` and ``forward_features``."""

    def __init__(self):
        super().__init__()
        self.backbone = TinyBackbone()

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images).mean((2, 3))


def _samples(root: str | Path) -> list[tuple[str, int]]:
    return scan_splits(root).samples["train"]


def _features(root: str | Path, cache: str | Path) -> FeatureDataModule:
    images = ImageFolderDataModule(scan_splits(root), image_size=SIZE, batch_size=8, num_workers=0, augment="none")
    return FeatureDataModule(images, TinyModel(), cache, pool="avg")


def _digest(arrays: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _feature_digest(data: FeatureDataModule) -> str:
    return _digest([t.numpy() for split in sorted(data.datasets) for t in data.datasets[split].tensors])


# --- the child processes ----------------------------------------------------------------------------


def child(kind: str, root: str, cache: str, sync: str = "", name: str = "") -> None:
    """One process of a test; its last stdout line is a JSON result."""
    torch.set_num_threads(1)
    if kind == "fsize":
        print(json.dumps(_under_a_size_limit(root, Path(cache))))
        return
    decodes: list[str] = []
    decode, extract = decoded_module._decode, feature_cache.extract_features

    # slow builds: both processes are surely inside decoded_cache / prepare_data at once
    def slow_decode(path: str, side: int) -> np.ndarray:
        decodes.append(path)
        time.sleep(0.02)
        return decode(path, side)

    def slow_extract(*args, **kwargs):
        time.sleep(1.0)
        return extract(*args, **kwargs)

    decoded_module._decode, feature_cache.extract_features = slow_decode, slow_extract
    samples = _samples(root)
    (Path(sync) / f"{name}.ready").touch()
    deadline = time.time() + 300
    while not (Path(sync) / "go").exists():
        assert time.time() < deadline, "never told to go"
        time.sleep(0.005)
    if kind == "decoded":
        path = decoded_cache(samples, SIZE, cache, threads=1)
        result = {"built": bool(decodes), "decodes": len(decodes), "path": str(path)}
        result["digest"] = _digest([open_decoded(path)])
    else:
        data = _features(root, cache)
        data.prepare_data()
        data.setup("fit")
        result = {"built": data.computed, "path": str(data.path), "digest": _feature_digest(data)}
    print(json.dumps(result))


def _under_a_size_limit(root: str, folder: Path) -> dict[str, list[str]]:
    """A real EFBIG: the file-size limit below the decoded cache and the checkpoint, SIGXFSZ ignored."""
    import resource
    import signal

    samples = _samples(root)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, resource.RLIM_INFINITY))
    out = {}
    for what, where, write in [
        ("decoded", folder / "decoded", lambda: decoded_cache(samples, SIZE, folder / "decoded")),
        (
            "checkpoint",
            folder / "c",
            lambda: AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(10**5)}, folder / "c" / "x"),
        ),
    ]:
        try:
            write()
            out[what] = ["no error"]
        except DiskFullError as err:
            out[what] = [str(err), *sorted(p.name for p in where.iterdir())]
    return out


def _race(kind: str, root: Path, tmp_path: Path) -> list[dict]:
    """Two child processes on one cache folder, released at the same instant."""
    sync = tmp_path / "sync"
    sync.mkdir()
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, kind, str(root), str(tmp_path / "cache"), str(sync), f"p{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    deadline = time.time() + 300
    while not all((sync / f"p{i}.ready").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "a child did not start"
        time.sleep(0.01)
    (sync / "go").touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]) | {"log": err})
    return sorted(results, key=lambda r: r["built"])  # [waiter, builder]


def _only_file_and_lock(folder: Path, path: str) -> None:
    name = Path(path).name
    assert sorted(p.name for p in folder.iterdir()) == [name, f"{name}.lock"]  # no temporary file


# --- two processes, one cache -----------------------------------------------------------------------


def test_two_processes_build_the_decoded_cache_once(toy_root, tmp_path):
    waiter, builder = _race("decoded", toy_root, tmp_path)
    samples = _samples(toy_root)
    assert (waiter["built"], builder["built"]) == (False, True)
    assert (waiter["decodes"], builder["decodes"]) == (0, len(samples))
    assert waiter["path"] == builder["path"] and waiter["digest"] == builder["digest"]
    logs = waiter["log"] + builder["log"]
    assert logs.count("decoded-image cache: ") == 1 and "decoded-image cache hit" in waiter["log"]
    single = decoded_cache(samples, SIZE, tmp_path / "single", threads=1)
    assert single.name == Path(builder["path"]).name
    assert _digest([open_decoded(single)]) == builder["digest"]
    assert open_decoded(single).shape == (len(samples), cached_size(SIZE), cached_size(SIZE), 3)
    _only_file_and_lock(tmp_path / "cache", builder["path"])


def test_two_processes_build_the_feature_cache_once(toy_root, tmp_path):
    waiter, builder = _race("features", toy_root, tmp_path)
    assert (waiter["built"], builder["built"]) == (False, True)  # computed: only for the builder
    assert waiter["path"] == builder["path"] and waiter["digest"] == builder["digest"]
    assert (waiter["log"] + builder["log"]).count("building feature cache") == 1
    assert "feature cache hit" in waiter["log"]
    single = _features(toy_root, tmp_path / "single")
    single.prepare_data()
    assert single.computed and single.path.name == Path(builder["path"]).name
    shared, alone = (torch.load(p, weights_only=True) for p in (builder["path"], single.path))
    assert shared.keys() == alone.keys() == {"train", "val", "test"}
    for split in shared:
        torch.testing.assert_close(shared[split], alone[split])
    _only_file_and_lock(tmp_path / "cache", builder["path"])


# --- a full disk ------------------------------------------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _one_line_naming(err: pytest.ExceptionInfo, folder: Path) -> str:
    message = str(err.value)
    assert "\n" not in message and f"in {folder}:" in message and "no space left" in message
    return message


def test_a_full_disk_stops_the_decoded_cache_before_decoding(toy_root, tmp_path, monkeypatch):
    def never(path, side):
        raise AssertionError("decoded although the space could not be reserved")

    monkeypatch.setattr(os, "posix_fallocate", _no_space)
    monkeypatch.setattr(decoded_module, "_decode", never)
    cache = tmp_path / "cache"
    with pytest.raises(DiskFullError) as caught:
        decoded_cache(_samples(toy_root), SIZE, cache)
    needed = 48 * cached_size(SIZE) ** 2 * 3 + 128  # the pixels and the .npy header
    assert f"it needs about {needed / 1024:.1f} KB" in _one_line_naming(caught, cache)
    assert [p.suffix for p in cache.iterdir()] == [".lock"]


def test_a_full_disk_stops_the_feature_cache(toy_root, tmp_path, monkeypatch):
    def full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        _no_space()

    monkeypatch.setattr(torch, "save", full)
    data = _features(toy_root, tmp_path / "cache")
    with pytest.raises(DiskFullError) as caught:
        data.prepare_data()
    _one_line_naming(caught, tmp_path / "cache")
    assert not data.computed
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".lock"]


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, path)

    def full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        _no_space()

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError) as caught:
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(3)}, path)
    _one_line_naming(caught, path.parent)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert list(path.parent.iterdir()) == [path]


def test_a_real_file_size_limit_is_one_line_and_leaves_no_temporary(toy_root, tmp_path):
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, "fsize", str(toy_root), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for what, folder in [("decoded", tmp_path / "decoded"), ("checkpoint", tmp_path / "c")]:
        message, *left = result[what]
        assert "\n" not in message and f"in {folder}:" in message and "file-size limit" in message, what
        assert all(name.endswith(".lock") for name in left), left  # no temporary file (a lock at most)
    assert "it needs about" in result["decoded"][0]
