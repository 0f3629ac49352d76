"""iPhone photos: HEIC loads with pillow-heif; without it the file is skipped with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datamodules.image_io as image_io
from datamodules.data_index import scan_splits
from datamodules.image_io import HEIF_MISSING, load_rgb

from toy_data import make_image_tree


def _heic(path: Path, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    pillow_heif = pytest.importorskip("pillow_heif", reason="pip install -e '.[heif]'")
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[:, : size[0] // 2] = (200, 40, 40)  # left half red, right half blue
    pixels[:, size[0] // 2 :] = (40, 60, 200)
    pillow_heif.from_pillow(Image.fromarray(pixels)).save(str(path), quality=95)
    return pixels


def test_a_heic_photo_loads_with_pillow_heif(tmp_path):
    pixels = _heic(tmp_path / "photo.heic")
    image = load_rgb(tmp_path / "photo.heic")
    assert image.size == (64, 48) and image.mode == "RGB"
    assert np.abs(np.asarray(image, dtype=float) - pixels).mean() < 12  # lossy HEVC


def test_without_pillow_heif_it_is_skipped_with_the_reason(tmp_path, monkeypatch):
    root = make_image_tree(tmp_path / "data", size=24)
    _heic(root / "train" / "cats" / "iphone.heic")
    index = scan_splits(root)
    assert any(path.endswith("iphone.heic") for path, _ in index.samples["train"])

    monkeypatch.setattr(image_io, "HEIF_AVAILABLE", False)
    index = scan_splits(root)
    assert not any(path.endswith("iphone.heic") for path, _ in index.samples["train"])
    assert [(Path(p).name, r) for p, r in index.skipped["train"]] == [("iphone.heic", HEIF_MISSING)]
    assert "install pillow-heif" in HEIF_MISSING
