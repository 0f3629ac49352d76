"""Tiny learnable image folders for tests: each class has its own dominant colour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(200, 40, 40), (40, 60, 200), (40, 180, 60), (200, 180, 40)]
SPLIT_DIRS = ("train", "validation", "test")


def make_image_tree(
    root: Path,
    classes: tuple[str, ...] = ("cats", "dogs"),
    per_class: dict[str, int] | None = None,
    size: int = 40,
    seed: int = 0,
) -> Path:
    """Write ``root/{train,validation,test}/<class>/*.png``; returns ``root``."""
    per_class = per_class or {"train": 24, "validation": 8, "test": 8}
    rng = np.random.default_rng(seed)
    for split in SPLIT_DIRS:
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class[split]):
                base = np.array(COLOURS[label % len(COLOURS)], dtype=np.float32)
                pixels = base + rng.normal(0, 40, size=(size, size, 3))
                # a random dark square so images are not flat colour fields
                x, y = rng.integers(0, size // 2, size=2)
                pixels[y : y + size // 3, x : x + size // 3] *= 0.4
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                image.save(folder / f"{name}.{i}.png")
    return root
