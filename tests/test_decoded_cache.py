"""The optional decoded-image cache: same data as the plain loader, crops inside the image."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from datamodules.data_index import scan_splits
from datamodules.decoded_cache import cached_size
from datamodules.image_folder import ImageFolderDataModule

from toy_data import make_image_tree


def _dm(root, tmp_path, decoded: bool, size: int = 24, augment: str = "none") -> ImageFolderDataModule:
    dm = ImageFolderDataModule(
        scan_splits(root),
        image_size=size,
        batch_size=8,
        num_workers=0,
        augment=augment,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        decoded_cache_dir=tmp_path / "cache" if decoded else None,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_cached_loader_gives_the_same_labels_and_shapes(toy_root, tmp_path):
    plain, cached = _dm(toy_root, tmp_path, False), _dm(toy_root, tmp_path, True)
    for split in ("train", "val", "test"):
        a, b = plain.datasets[split], cached.datasets[split]
        assert len(a) == len(b)
        assert [label for _, label in a.samples] == [label for _, label in b.samples]
        key = (0, 3) if split == "train" else 3
        xa, ya = a[key]
        xb, yb = b[key]
        assert ya == yb and xa.shape == xb.shape == (3, 24, 24)
    # evaluation images come from the files, as for stage=test and predict.py: identical
    for split in ("val", "test"):
        assert cached.datasets[split].decoded is None
        assert torch.equal(plain.datasets[split][5][0], cached.datasets[split][5][0])
    assert cached.datasets["train"].decoded is not None


def test_random_crops_stay_inside_the_image(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class={"train": 3, "validation": 1, "test": 1}, size=40)
    colour = (200, 30, 30)
    for path in (root / "train").rglob("*.png"):
        Image.new("RGB", (60, 45), colour).save(path)  # flat colour: any padding would show
    dm = _dm(root, tmp_path, True, size=24, augment="none")
    expected = (torch.tensor(colour) / 255 - 0.5) / 0.5
    for epoch in range(4):
        for i in range(len(dm.datasets["train"])):
            x, _ = dm.datasets["train"][(epoch, i)]
            assert torch.allclose(x, expected.view(3, 1, 1).expand_as(x), atol=0.02)


def test_cache_is_rebuilt_when_the_image_size_changes(toy_root, tmp_path):
    cache = tmp_path / "cache"
    _dm(toy_root, tmp_path, True, size=24)
    first = sorted(p.name for p in cache.iterdir())
    _dm(toy_root, tmp_path, True, size=24)
    assert sorted(p.name for p in cache.iterdir()) == first  # reused
    _dm(toy_root, tmp_path, True, size=32)
    files = sorted(cache.glob("*.u8"))
    assert len(files) == 2
    # beside each cache only its lock file: no temporary file left behind
    expected = [f.name for f in files] + [f"{f.name}.lock" for f in files]
    assert sorted(p.name for p in cache.iterdir()) == sorted(expected)
    shapes = {np.load(f, mmap_mode="r").shape[1] for f in files}
    assert shapes == {cached_size(24), cached_size(32)}


def test_training_crops_differ_between_epochs(toy_root, tmp_path):
    dm = _dm(toy_root, tmp_path, True, augment="none")
    a, b = dm.datasets["train"][(0, 1)][0], dm.datasets["train"][(1, 1)][0]
    assert not torch.equal(a, b)
    assert torch.equal(a, dm.datasets["train"][(0, 1)][0])  # seeded per (epoch, index)
