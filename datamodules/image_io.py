"""Reading user images robustly: odd modes are converted, unreadable files are found up front.

Every file is decoded once before training (JPEGs at a reduced DCT scale, which still reads all
their data, so truncation is caught): a bad file is then skipped and listed instead of crashing a
loader worker in the middle of an epoch.
"""

from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

# Up to ~180 megapixels is decoded (PIL warns above 89 MP); beyond that the file is skipped.
MAX_PIXELS = 180_000_000
# Bump when check_image's verdicts change (e.g. a new decoder): remembered verdicts are then discarded.
SCAN_MEMORY_VERSION = 1
# torchvision's list plus GIF (Pillow reads its first frame).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            opened = Image.open(path)
        except Image.DecompressionBombError as err:
            raise ValueError(f"too large: {err}") from None
        with opened as image:
            if image.width * image.height > MAX_PIXELS:
                raise ValueError(f"too large ({image.width}x{image.height} pixels)")
            if min_size and image.format == "JPEG":
                image.draft("RGB", (2 * min_size, 2 * min_size))
            image.load()
            return _to_rgb(image)


def check_image(path: str) -> str | None:
    """None if ``path`` decodes as an image, else a short reason."""
    try:
        load_rgb(path, min_size=16)
    except Exception as err:  # noqa: BLE001 - any decoder failure means "unreadable"
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return text[:200]
    return None


def find_bad_files(paths: list[str], threads: int = 4, memory: str | Path | None = None) -> dict[str, str]:
    """``{path: reason}`` for every file in ``paths`` that does not decode (PIL releases the GIL).

    ``memory``: a JSON file remembering each file's verdict with its size and modification time;
    files unchanged since they were last checked are only stat'ed, not decoded again (a second
    scan of 25,000 files takes a fraction of a second instead of decoding them all). The file
    keeps entries for ``paths`` only, so deleted files disappear from it."""
    known = _read_memory(memory)
    stamps = {path: _stamp(path) for path in paths}
    verdicts = {path: known[path][2] for path in paths if path in known and known[path][:2] == stamps[path]}
    todo = [path for path in paths if path not in verdicts]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        verdicts |= dict(zip(todo, pool.map(check_image, todo, chunksize=32)))
    if memory is not None and (todo or len(known) != len(paths)):
        _write_memory(memory, {path: [*stamps[path], verdicts[path]] for path in paths})
    return {path: verdicts[path] for path in paths if verdicts[path] is not None}


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
        return data["files"] if data.get("version") == SCAN_MEMORY_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # missing or damaged: check everything again


def _write_memory(memory: str | Path, files: dict[str, list]) -> None:
    path = Path(memory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # several DDP ranks may write at once
    tmp.write_text(json.dumps({"version": SCAN_MEMORY_VERSION, "files": files}))
    os.replace(tmp, path)
