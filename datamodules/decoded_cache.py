"""Decoded-image cache: every image decoded and resized once, kept in a memory-mapped file.

JPEG decoding then leaves the training loop: a sample is a slice of the map, and random crops
and flips are applied to that small uint8 tensor (``train_transform(..., cached=True)``).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from core.atomic_io import atomic_target, file_lock, preallocate
from datamodules.image_io import DECODE_VERSION, load_rgb, unreadable_reason
from datamodules.layout import changed_since_scan, stat_scanned

# Cached side length relative to data.image_size: room for random crops of image_size.
MARGIN = 1.15


def cached_size(image_size: int) -> int:
    return int(round(image_size * MARGIN))


def _key(samples: list[tuple[str, int]], side: int) -> str:
    stats = [(p, label, st.st_size, st.st_mtime_ns) for p, label in samples for st in [stat_scanned(p)]]
    # DECODE_VERSION: a cache decoded by an older load_rgb (e.g. without EXIF orientation) is not reused
    return hashlib.sha256(json.dumps([side, DECODE_VERSION, stats]).encode()).hexdigest()[:20]


def _decode(path: str, side: int) -> np.ndarray:
    try:
        image = load_rgb(path, side)
    except Exception as err:  # noqa: BLE001 - as the scan's check: any decoder failure; each row has its image
        raise changed_since_scan(path, unreadable_reason(err)) from None
    return np.asarray(image.resize((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0))


def decoded_cache(samples: list[tuple[str, int]], image_size: int, cache_dir: str | Path, threads: int = 4) -> Path:
    """The path of a ``(N, S, S, 3)`` uint8 file for ``samples`` (S = cached_size), built if missing.

    Any number of processes may share ``cache_dir``: one builds the file, the others wait for it."""
    side = cached_size(image_size)
    path = Path(cache_dir) / f"decoded-{side}px-{_key(samples, side)}.u8"
    if path.is_file():
        return path
    with file_lock(path):
        if path.is_file():  # built while this process waited for the lock
            rank_zero_info(f"decoded-image cache hit: {path} (built by another process)")
            return path
        _build(samples, side, path, threads)
    rank_zero_info(f"decoded-image cache: {len(samples)} images at {side}px in {path}")
    return path


def _build(samples: list[tuple[str, int]], side: int, path: Path, threads: int) -> None:
    shape = (len(samples), side, side, 3)
    # the temporary name is this process's own: a second builder never truncates a file mapped here
    with atomic_target(path, needed=int(np.prod(shape))) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        try:
            # the file is sparse: reserve its blocks now, or a full disk is a SIGBUS in the middle of the copy
            with open(tmp, "r+b") as f:
                preallocate(f.fileno(), os.fstat(f.fileno()).st_size, path)
            with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
                for i, image in enumerate(pool.map(lambda s: _decode(s[0], side), samples, chunksize=16)):
                    array[i] = image
            array.flush()
        finally:
            del array


def open_decoded(path: str | Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")
