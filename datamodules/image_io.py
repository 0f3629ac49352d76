"""Reading user images robustly: odd modes are converted, EXIF orientation is applied,
unreadable files are found up front.

Every file is decoded once before training (JPEGs at a reduced DCT scale, which still reads all
their data, so truncation is caught): a bad file is then skipped and listed instead of crashing a
loader worker in the middle of an epoch. The same decode gives each file's perceptual hash, for
the near-duplicate check across splits (``datamodules.near_duplicates``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from core.atomic_io import write_text_atomic
from core.errors import first_line
from datamodules.near_duplicates import dhash

# Up to ~180 megapixels is decoded (PIL warns above 89 MP); beyond that the file is skipped.
MAX_PIXELS = 180_000_000
# Bump when load_rgb's pixels change: caches of decoded images and features built before are then
# not reused (2: EXIF orientation applied).
DECODE_VERSION = 2
HEIF_EXTENSIONS = (".heic", ".heif")  # iPhone photos


def _register_heif() -> bool:
    """HEIC/HEIF decoding through pillow-heif, when installed (an optional extra)."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


HEIF_AVAILABLE = _register_heif()
HEIF_MISSING = "HEIC/HEIF image: install pillow-heif (pip install -e '.[heif]')"
# Bump when check_image's results change (a new decoder, a new hash): remembered ones are then
# discarded. Installing pillow-heif changes the verdict on HEIC files, hence the suffix.
SCAN_MEMORY_VERSION = "2+heif" if HEIF_AVAILABLE else "2"  # 2: EXIF orientation and the dHash
_HEX_DIGITS = set("0123456789abcdef")
# torchvision's list plus GIF (Pillow reads its first frame) and HEIC/HEIF: listed also without
# pillow-heif, so such files are skipped with the reason instead of passed over as non-images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif", *HEIF_EXTENSIONS)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any PIL mode: 16/32-bit grayscale is rescaled, transparency composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(pixels.max()), 1.0)
        return Image.fromarray(np.clip(pixels * (255.0 / top), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, P, CMYK, YCbCr, 1, RGB


def load_rgb(path: str | Path, min_size: int | None = None) -> Image.Image:
    """Decode ``path`` as an RGB image. ``min_size``: JPEGs much larger than needed are decoded
    at a reduced scale that still leaves at least ``2 * min_size`` pixels per side."""
    if not HEIF_AVAILABLE and str(path).lower().endswith(HEIF_EXTENSIONS):
        raise ValueError(HEIF_MISSING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", "Corrupt EXIF data", UserWarning)  # it only costs the orientation
        try:
            opened = Image.open(path)
        except Image.DecompressionBombError as err:
            raise ValueError(f"too large: {err}") from None
        with opened as image:
            if image.width * image.height > MAX_PIXELS:
                raise ValueError(f"too large ({image.width}x{image.height} pixels)")
            if min_size and image.format == "JPEG":
                image.draft("RGB", (2 * min_size, 2 * min_size))  # a square: rotation keeps it valid
            image.load()
            _apply_orientation(image)
            return _to_rgb(image)


def _apply_orientation(image: Image.Image) -> None:
    """Turn a loaded image upright by its EXIF Orientation (phone photos are stored sideways
    with a tag saying so). Unreadable EXIF leaves the pixels as stored: metadata alone never
    makes a picture unusable."""
    try:
        if image.getexif().get(0x0112, 1) in (2, 3, 4, 5, 6, 7, 8):
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of upright images
    except Exception:  # noqa: BLE001, S110 - damaged EXIF: keep the stored orientation
        pass


class Check(NamedTuple):
    """What the pre-training decode of one file found."""

    reason: str | None  # None: the file decodes
    dhash: int | None  # its 64-bit difference hash (None when it does not decode)
    # the operating system failed to open or read it (EIO, EACCES, ...): skipped this time, but
    # not remembered as undecodable, since the next run may read it (a transient fault)
    io_error: bool = False


def unreadable_reason(err: BaseException) -> str:
    """Why an image did not decode, for a skip list: the error's first line (at most 200 characters);
    for a system error its text alone (the path is listed beside it)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return first_line(err, 200)


def check_image(path: str) -> Check:
    """Decode ``path`` (at a reduced scale) and hash the picture, or say why it does not decode."""
    try:
        return Check(None, dhash(load_rgb(path, min_size=16)))
    except Exception as err:  # noqa: BLE001 - any decoder failure means "unreadable"
        io_error = isinstance(err, OSError) and err.errno is not None  # PIL's decode errors carry none
        return Check(unreadable_reason(err), None, io_error)


def scan_files(paths: list[str], threads: int = 4, memory: str | Path | None = None) -> dict[str, Check]:
    """Every file's ``Check`` (decoded on ``threads`` threads; PIL releases the GIL).

    ``memory``: a JSON file remembering each file's check with its size and modification time;
    files unchanged since they were last checked are only stat'ed, not decoded again (see
    ``benchmarks/scan_scaling.py``). The file keeps entries for ``paths`` only, so deleted files
    disappear from it."""
    with _gc_paused():
        known = _read_memory(memory)
        stamps = {path: _stamp(path) for path in paths}
        checks = {path: _remembered(known[path]) for path in paths if path in known and known[path][:2] == stamps[path]}
    todo = [path for path in paths if path not in checks]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        checks |= dict(zip(todo, pool.map(check_image, todo, chunksize=32)))
    if memory is not None and (todo or len(known) != len(paths)):
        kept = [path for path in paths if not checks[path].io_error]
        _write_memory(memory, {path: [*stamps[path], *_storable(checks[path])] for path in kept})
    return {path: checks[path] for path in paths}


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Reading the memory creates several objects per file and no cycles: with a large heap
    (torch, the file lists) the cyclic GC would otherwise run again and again over it, for much
    of a re-scan's time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def bad_reasons(checks: dict[str, Check]) -> dict[str, str]:
    """``{path: reason}`` for every checked file that does not decode (see ``scan_files``)."""
    return {path: check.reason for path, check in checks.items() if check.reason is not None}


def _remembered(entry: list) -> Check:
    return Check(entry[2], None if entry[3] is None else int(entry[3], 16))


def _storable(check: Check) -> list:
    return [check.reason, None if check.dhash is None else f"{check.dhash:016x}"]  # JSON has no uint64


def _stamp(path: str) -> list[int]:
    try:
        stat = os.stat(path)
    except OSError:
        return [-1, -1]  # vanished since it was listed: never matches, so it is checked (and fails)
    return [stat.st_size, stat.st_mtime_ns]


def _read_memory(memory: str | Path | None) -> dict[str, list]:
    if memory is None:
        return {}
    try:
        data = json.loads(Path(memory).read_text())
        if data.get("version") != SCAN_MEMORY_VERSION:
            return {}
        return {path: entry for path, entry in data["files"].items() if _valid(entry)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # missing or damaged: check everything again


def _valid(entry: object) -> bool:
    """A remembered ``[size, mtime, reason, dhash hex]``; anything else is checked again."""
    if not (isinstance(entry, list) and len(entry) == 4):
        return False
    digest = entry[3]
    return digest is None or (isinstance(digest, str) and len(digest) == 16 and set(digest) <= _HEX_DIGITS)


def _write_memory(memory: str | Path, files: dict[str, list]) -> None:
    # several DDP ranks may write at once: atomic_io's temporary names are per process
    write_text_atomic(memory, json.dumps({"version": SCAN_MEMORY_VERSION, "files": files}))
