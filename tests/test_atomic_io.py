"""atomic_io: strict JSON, per-process temporary names, all-or-nothing writes, a full disk as one line."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core import atomic_io
from core.atomic_io import (
    atomic_target,
    file_lock,
    json_text,
    preallocate,
    temp_path,
    torch_save_atomic,
    write_json_atomic,
    write_text_atomic,
)
from core.errors import DiskFullError

ROOT = Path(__file__).resolve().parent.parent


def _no_constants(name: str):
    raise AssertionError(f"a reader met {name}")


def test_non_finite_numbers_become_null_and_are_listed(tmp_path):
    data = {"loss": math.nan, "curve": [1.0, -math.inf], "val": {"acc": 0.5, "nll": math.inf}}
    text = json_text(data)
    parsed = json.loads(text, parse_constant=_no_constants)
    assert parsed == {
        "loss": None,
        "curve": [1.0, None],
        "val": {"acc": 0.5, "nll": None},
        "non_finite": ["loss", "curve[1]", "val.nll"],
    }
    assert math.isnan(data["loss"])  # the caller's data is not modified
    write_json_atomic(tmp_path / "m.json", data)
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=_no_constants) == parsed
    assert "non_finite" not in json.loads(json_text({"acc": 1.0}))


def test_temporary_names_are_hidden_unique_and_beside_the_target(tmp_path):
    a, b = temp_path(tmp_path / "x.json"), temp_path(tmp_path / "x.json")
    assert a != b
    assert a.parent == b.parent == tmp_path
    assert a.name.startswith(".x.json.") and f".{os.getpid()}." in a.name and a.suffix == ".tmp"


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_text_atomic(path, "old\n")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_target(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("rename failed")))
    with pytest.raises(OSError, match="rename failed"):
        write_text_atomic(path, "new\n")
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [path]


def test_the_file_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda *a: events.append("replace") or real_replace(*a))
    write_text_atomic(tmp_path / "a.txt", "x")
    assert events == ["fsync", "replace", "fsync"]  # the file, the rename, then the folder


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left"), (errno.EFBIG, "file-size limit")])
def test_a_full_disk_is_one_line_naming_the_folder(tmp_path, code, words):
    path = tmp_path / "sub" / "big.bin"
    with pytest.raises(DiskFullError) as caught:
        with atomic_target(path, needed=3 * 1024**3) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(code, os.strerror(code))
    message = str(caught.value)
    assert "\n" not in message and str(path.parent) in message and words in message
    assert "about 3.0 GB" in message
    assert isinstance(caught.value, OSError)  # callers catching OSError still do
    assert list(path.parent.iterdir()) == []


def test_preallocate_reports_a_full_disk_and_tolerates_no_fallocate(tmp_path, monkeypatch):
    path = tmp_path / "cache.u8"

    def fail(code):
        def fallocate(fd, offset, size):
            raise OSError(code, os.strerror(code))

        return fallocate

    with open(path, "wb") as f:
        monkeypatch.setattr(os, "posix_fallocate", fail(errno.ENOSPC))
        with pytest.raises(DiskFullError, match=r"cannot write cache\.u8 in .*about 2\.0 MB"):
            preallocate(f.fileno(), 2 * 1024**2, path)
        monkeypatch.setattr(os, "posix_fallocate", fail(errno.EOPNOTSUPP))
        preallocate(f.fileno(), 2 * 1024**2, path)  # a file system without fallocate: written as before
        monkeypatch.setattr(os, "posix_fallocate", fail(errno.EIO))
        with pytest.raises(OSError) as caught:
            preallocate(f.fileno(), 2 * 1024**2, path)
        assert not isinstance(caught.value, DiskFullError)


def test_torch_save_runtime_errors_are_told_apart_by_the_disk(tmp_path, monkeypatch):
    """torch.save's C++ writer hides errno: a full disk is recognised by asking the file system."""
    path = tmp_path / "features.pt"

    def writer_fails(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", writer_fails)
    # the disk has room: not a full disk, an I/O error (one line at the entry points, exit 3)
    with pytest.raises(OSError, match="file write failed") as caught:
        torch_save_atomic({"x": torch.zeros(1000)}, path)
    assert caught.value.errno == errno.EIO and not isinstance(caught.value, DiskFullError)
    assert list(tmp_path.iterdir()) == []

    def no_room(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with pytest.raises(DiskFullError, match="no space left.*about 3.9 KB") as caught:
        torch_save_atomic({"x": torch.zeros(1000)}, path)
    assert "\n" not in str(caught.value) and str(tmp_path) in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_payload_bytes_counts_nested_tensors_and_arrays():
    import numpy as np

    assert atomic_io.payload_bytes({"a": torch.zeros(10), "b": [np.zeros(4, np.uint8), "text", 3]}) == 44


def test_file_lock_excludes_a_second_process(tmp_path):
    target = tmp_path / "shared.bin"
    child = (
        "import sys, time\n"
        "from core.atomic_io import file_lock\n"
        "print('waiting', flush=True)\n"
        "with file_lock(sys.argv[1]):\n"
        "    print(time.time(), flush=True)\n"
    )
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    with file_lock(target):
        proc = subprocess.Popen([sys.executable, "-c", child, str(target)], stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout.readline().strip() == "waiting"
        time.sleep(0.5)
        assert proc.poll() is None  # still blocked on the lock
        released = time.time()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert float(out.strip()) >= released
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin.lock"]
