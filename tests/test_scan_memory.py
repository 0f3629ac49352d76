"""The decode check of each file is remembered: a re-scan of an unchanged folder decodes nothing."""

from __future__ import annotations

import json
import os

import pytest
import torch

import datamodules.image_io as image_io
from datamodules.data_index import scan_memory_path, scan_splits
from lightning_modules.replica_check import differing_tensors, tensor_digests

from toy_data import make_image_tree


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Every file ``check_image`` decodes, in order."""
    seen: list[str] = []
    original = image_io.check_image

    def counting(path: str):
        seen.append(path)
        return original(path)

    monkeypatch.setattr(image_io, "check_image", counting)
    return seen


def test_rescan_decodes_only_new_or_changed_files(tmp_path, decodes):
    root = make_image_tree(tmp_path / "d", per_class={"train": 5, "validation": 2, "test": 2}, size=16)
    bad = root / "train" / "cats" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    cache = tmp_path / "cache"

    first = scan_splits(root, cache_dir=cache)
    assert len(decodes) == 19 and [p for p, _ in first.skipped["train"]] == [str(bad)]

    decodes.clear()
    second = scan_splits(root, cache_dir=cache)
    assert decodes == []  # only stat'ed
    assert second.samples == first.samples and second.skipped == first.skipped  # the bad file stays out

    changed = root / "train" / "dogs" / "dogs.0.png"
    changed.write_bytes(b"now corrupt")
    os.utime(changed, ns=(1, 1))  # a different modification time, whatever the clock's resolution
    added = root / "test" / "dogs" / "dogs.new.png"
    added.write_bytes((root / "test" / "dogs" / "dogs.1.png").read_bytes())
    (root / "validation" / "cats" / "cats.0.png").unlink()
    decodes.clear()
    third = scan_splits(root, cache_dir=cache)
    assert sorted(decodes) == sorted([str(changed), str(added)])
    assert str(changed) in dict(third.skipped["train"])

    remembered = json.loads(scan_memory_path(cache, root).read_text())["files"]
    assert str(root / "validation" / "cats" / "cats.0.png") not in remembered  # deleted: forgotten
    assert len(remembered) == 19  # 19 files before, one added, one deleted


def test_damaged_memory_means_checking_everything_again(tmp_path, decodes):
    root = make_image_tree(tmp_path / "d", per_class={"train": 2, "validation": 1, "test": 1}, size=16)
    scan_splits(root, cache_dir=tmp_path)
    scan_memory_path(tmp_path, root).write_text("{not json")
    decodes.clear()
    scan_splits(root, cache_dir=tmp_path)
    assert len(decodes) == 8


def test_replica_digests_catch_a_single_changed_weight():
    state = {"a": torch.randn(64, 3, 3, 3), "b": torch.randn(10), "steps": torch.tensor(7)}
    names, mine = tensor_digests(state)
    assert names == ["a", "b"]  # integer tensors are not weights
    other = {k: v.clone() for k, v in state.items()}
    other["a"][5, 1, 2, 0] = torch.nextafter(other["a"][5, 1, 2, 0], torch.tensor(float("inf")))  # one ulp
    _, theirs = tensor_digests(other)
    assert differing_tensors(torch.stack([mine, mine])).tolist() == [False, False]
    assert differing_tensors(torch.stack([mine, theirs])).tolist() == [True, False]
    assert tensor_digests({"h": state["b"].to(torch.bfloat16)})[1].shape == (1,)


def test_a_read_error_at_the_scan_is_skipped_but_not_remembered(tmp_path, monkeypatch):
    """A file the OS failed to read (EIO: a transient fault, a flaky mount) is left out of this run,
    listed with its reason, and checked again by the next scan: never remembered as undecodable."""
    import errno

    root = make_image_tree(tmp_path / "d", per_class={"train": 3, "validation": 2, "test": 2}, size=16)
    cache = tmp_path / "cache"
    flaky = str(root / "train" / "cats" / "cats.0.png")
    original = image_io.load_rgb

    def failing_once(path, *args, **kwargs):
        if str(path) == flaky:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(image_io, "load_rgb", failing_once)
    first = scan_splits(root, cache_dir=cache)
    assert [p for p, _ in first.skipped["train"]] == [flaky]
    assert flaky not in json.loads(scan_memory_path(cache, root).read_text())["files"]
    monkeypatch.setattr(image_io, "load_rgb", original)
    second = scan_splits(root, cache_dir=cache)  # the fault is over: the file is back
    assert second.skipped["train"] == [] and flaky in [p for p, _ in second.samples["train"]]
