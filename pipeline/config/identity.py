"""What makes a run's numbers mean something, recorded in every checkpoint and compared on reuse.

A checkpoint's ``identity`` names its data (root, classes in order, a digest of each split's file
list) and how images reach the network (size, mean/std, augmentation, class weights). Resuming a
run, starting a fine-tune from ``finetune.init_ckpt`` and ``ckpt_path=last`` all compare it with the
current run's and refuse any difference in one line, before anything is written: otherwise a
renamed class folder silently relabels the model's outputs, and a re-split folder tests on images
the model trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from core.errors import IdentityError

# What a fine-tune started from another run's weights may change: its own training choices.
TRAINING_CHOICES = ("data.augment", "class_weights")


def split_digest(samples: list[tuple[str, int]], root: str | os.PathLike) -> dict[str, Any]:
    """The file list of one split (paths relative to the data root, with their labels), hashed."""
    listing = sorted((os.path.relpath(path, root), label) for path, label in samples)
    digest = hashlib.sha256(json.dumps(listing, ensure_ascii=True).encode()).hexdigest()[:16]
    return {"files": len(listing), "digest": digest}


def run_identity(
    data_root: str | os.PathLike,
    classes: list[str],
    samples: dict[str, list[tuple[str, int]]],
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: str,
    class_weights: list[float] | None,
) -> dict[str, Any]:
    root = Path(data_root).resolve()
    return {
        "data.root": str(root),
        "classes": list(classes),
        "data.image_size": int(image_size),
        "mean": [round(float(x), 6) for x in mean],
        "std": [round(float(x), 6) for x in std],
        "data.augment": augment,
        "class_weights": None if class_weights is None else [round(float(w), 6) for w in class_weights],
        "split": {split: split_digest(items, data_root) for split, items in sorted(samples.items())},
    }


def _describe(key: str, before: Any, now: Any) -> str:
    if key == "split":
        changed = [
            f"{split} ({(before or {}).get(split, {}).get('files', 0)} -> {(now or {}).get(split, {}).get('files', 0)} "
            "files)"
            for split in sorted(set(before or {}) | set(now or {}))
            if (before or {}).get(split) != (now or {}).get(split)
        ]
        return "the file list of " + ", ".join(changed)
    return f"{key} {before} -> {now}"


def differences(recorded: dict[str, Any], now: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Each item that differs, as ``key before -> now``."""
    keys = [k for k in dict.fromkeys([*recorded, *now]) if k not in ignore]
    return [_describe(k, recorded.get(k), now.get(k)) for k in keys if recorded.get(k) != now.get(k)]


def check_identity(
    what: str, path: str | os.PathLike, recorded: dict[str, Any] | None, now: dict[str, Any], ignore=()
) -> None:
    """Refuse (``IdentityError``, one line) a checkpoint whose identity differs from ``now``."""
    if recorded is None:
        raise IdentityError(
            f"{what}: checkpoint {path} records no data identity (written by an older version of this project); "
            "train again"
        )
    found = differences(recorded, now, ignore)
    if found:
        raise IdentityError(
            f"{what}: checkpoint {path} was trained on other data or preprocessing: {'; '.join(found)}. "
            "Nothing was written; use the run's own data and settings, or start a new run (no ckpt_path)"
        )
