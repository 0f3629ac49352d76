"""Input shifts for the shift report: a decoded image (PIL RGB, as ``load_rgb`` gives it) damaged in
one of a fixed set of ways, at two severities, before the usual evaluation transform.

Each shift is a pure function of ``(image, shift, severity, seed, key)``: its randomness (the noise,
the direction of a rotation) comes from a generator seeded from those values alone, never from the
global RNG state, so the shifted test set is the same in every worker process, on every machine and
in every run with the same ``seed``. Severity 2 is always the stronger damage.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from datamodules.choices import SHIFT_NAMES

SEVERITIES = (1, 2)


@dataclass(frozen=True)
class Shift:
    name: str
    levels: tuple[float, float]  # the parameter at severity 1 and 2
    setting: str  # how to read the parameter, e.g. "JPEG quality {}"
    apply: Callable[[Image.Image, float, np.random.Generator], Image.Image]

    def describe(self, severity: int) -> str:
        return self.setting.format(self.levels[severity - 1])


def _low_resolution(image: Image.Image, side: float, rng: np.random.Generator) -> Image.Image:
    # an image already at most `side` px is left as it is: the shift loses detail, never adds any
    if min(image.size) <= side:
        return image
    return F.resize(image, int(side), interpolation=InterpolationMode.BILINEAR, antialias=True)


def _jpeg(image: Image.Image, quality: float, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _blur(image: Image.Image, fraction: float, rng: np.random.Generator) -> Image.Image:
    # sigma relative to the shorter side: the same blur at any photo size once resized to the model's
    return image.filter(ImageFilter.GaussianBlur(radius=fraction * min(image.size)))


def _noise(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    noise = rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(sigma * 255)
    return Image.fromarray(np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8))


def _brightness(image: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    return F.adjust_brightness(image, factor)


def _contrast(image: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    return F.adjust_contrast(image, factor)


def _grayscale(image: Image.Image, saturation: float, rng: np.random.Generator) -> Image.Image:
    return F.adjust_saturation(image, saturation)


def _rotation(image: Image.Image, degrees: float, rng: np.random.Generator) -> Image.Image:
    sign = 1.0 if rng.random() < 0.5 else -1.0  # a fixed magnitude keeps the severity exact
    return F.rotate(image, sign * degrees, interpolation=InterpolationMode.BILINEAR)


# The one list of shifts (config validation, the report's rows and its order all come from it).
SHIFTS: dict[str, Shift] = {
    s.name: s
    for s in (
        Shift("lowres", (112, 64), "shorter side {:g} px", _low_resolution),
        Shift("jpeg", (30, 10), "JPEG quality {:g}", _jpeg),
        Shift("blur", (0.01, 0.02), "blur sigma {:.0%} of shorter side", _blur),
        Shift("noise", (0.08, 0.16), "Gaussian noise sd {:g}", _noise),
        Shift("brightness", (0.6, 0.3), "brightness x{:g}", _brightness),
        Shift("contrast", (0.6, 0.3), "contrast x{:g}", _contrast),
        Shift("grayscale", (0.5, 0.0), "saturation x{:g}", _grayscale),
        Shift("rotation", (5, 10), "rotated {:g} degrees", _rotation),
    )
}


def variant_name(shift: str, severity: int) -> str:
    """``jpeg-2``: one shift at one severity, as the report and TensorBoard name it."""
    return f"{shift}-{severity}"


def shift_rng(seed: int, shift: str, severity: int, key: int | str) -> np.random.Generator:
    """The generator of one image's shift: a hash of the four values (not Python's ``hash``,
    which is salted per process)."""
    text = f"{seed}\0{shift}\0{severity}\0{key}".encode("utf-8", errors="surrogateescape")
    return np.random.default_rng(int.from_bytes(hashlib.blake2b(text, digest_size=16).digest(), "little"))


def apply_shift(image: Image.Image, shift: str, severity: int, seed: int, key: int | str) -> Image.Image:
    """``image`` under ``shift`` at ``severity`` (1 or 2); ``key`` identifies the image (its index
    in the split, or its path)."""
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; choose from: {', '.join(SHIFT_NAMES)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    spec = SHIFTS[shift]
    return spec.apply(image, spec.levels[severity - 1], shift_rng(seed, shift, severity, key))
