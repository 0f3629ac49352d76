"""EXIF orientation: a picture stored sideways with an Orientation tag is read upright."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.image_io import check_image, load_rgb

ORIENTATION = 0x0112
# Orientation tag -> the transpose that turns the stored pixels upright (as a viewer does it).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# ... and its inverse, which turns an upright picture into what a camera stores with that tag.
STORED = {**UPRIGHT, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def upright_picture(width: int = 96, height: int = 64) -> Image.Image:
    """Smooth and asymmetric (no flip or rotation maps it onto itself): gradients plus a block
    near the top-left corner. Smooth, so JPEG keeps it within a few levels."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([255 * x / width, 255 * y / height, np.full_like(x, 128)], axis=-1)
    pixels[height // 8 : height // 3, width // 10 : width // 3] = (30, 220, 60)
    return Image.fromarray(pixels.astype(np.uint8))


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


def save_sideways(upright: Image.Image, path: Path, orientation: int, **kwargs) -> None:
    upright.transpose(STORED[orientation]).save(path, exif=_exif(orientation), **kwargs)


def mean_abs_difference(a: Image.Image, b: Image.Image) -> float:
    if a.size != b.size:
        return float("inf")
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


def test_the_stored_transposes_invert_the_viewer_transposes():
    picture = upright_picture()
    for orientation in UPRIGHT:
        round_trip = picture.transpose(STORED[orientation]).transpose(UPRIGHT[orientation])
        assert np.array_equal(np.asarray(round_trip), np.asarray(picture)), orientation


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_jpeg_with_orientation_tag_loads_upright(tmp_path, orientation):
    upright = upright_picture()
    path = tmp_path / f"o{orientation}.jpg"
    save_sideways(upright, path, orientation, quality=95)
    with Image.open(path) as raw:
        assert raw.getexif()[ORIENTATION] == orientation
        as_stored = raw.convert("RGB")
    loaded = load_rgb(path)
    assert loaded.size == upright.size
    assert mean_abs_difference(loaded, upright) < 3.0  # JPEG noise only
    assert mean_abs_difference(as_stored, upright) > 20.0  # what was read before the fix


@pytest.mark.parametrize("orientation", [6, 8])
def test_reduced_scale_decode_is_upright_too(tmp_path, orientation):
    """``min_size`` decodes a large JPEG at a reduced DCT scale (``draft``), then turns it."""
    upright = upright_picture(960, 640)
    path = tmp_path / "big.jpg"
    save_sideways(upright, path, orientation, quality=95)
    loaded = load_rgb(path, min_size=100)
    assert loaded.size == (480, 320)  # half scale: still at least 2 x min_size per side, upright
    assert mean_abs_difference(loaded, upright.resize(loaded.size, Image.Resampling.BOX)) < 3.0


def test_png_orientation_tag_is_applied_exactly(tmp_path):
    upright = upright_picture()
    save_sideways(upright, tmp_path / "o6.png", 6)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "o6.png")), np.asarray(upright))


def test_upright_and_untagged_files_are_unchanged(tmp_path):
    upright = upright_picture()
    upright.save(tmp_path / "plain.png")
    upright.save(tmp_path / "o1.png", exif=_exif(1))  # tagged "already upright"
    for name in ("plain.png", "o1.png"):
        assert np.array_equal(np.asarray(load_rgb(tmp_path / name)), np.asarray(upright)), name


def test_damaged_exif_does_not_make_a_file_unreadable(tmp_path):
    upright = upright_picture()
    path = tmp_path / "damaged.jpg"
    upright.save(path, quality=95, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f garbage")
    assert check_image(str(path)).reason is None
    assert mean_abs_difference(load_rgb(path), upright) < 3.0


def test_the_scan_hashes_the_upright_picture(tmp_path):
    """The near-duplicate check sees what training sees: a sideways-stored copy of a picture
    hashes like the upright original."""
    upright = upright_picture()
    upright.save(tmp_path / "upright.jpg", quality=95)
    save_sideways(upright, tmp_path / "sideways.jpg", 6, quality=95)
    a, b = (check_image(str(tmp_path / name)).dhash for name in ("upright.jpg", "sideways.jpg"))
    assert bin(a ^ b).count("1") <= 2
