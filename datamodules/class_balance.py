"""Class imbalance: per-class counts, a warning for rare classes, loss weights from the counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datamodules.data_index import SplitIndex

RARE_SHARE = 0.10  # a class under this share of the training images gets a warning


def class_counts(index: SplitIndex) -> dict[str, list[int]]:
    """Images per class (in ``index.classes`` order) of each split."""
    counts = {}
    for split, samples in index.samples.items():
        per_class = [0] * len(index.classes)
        for _, label in samples:
            per_class[label] += 1
        counts[split] = per_class
    return counts


def describe_counts(index: SplitIndex) -> tuple[str, list[str]]:
    """One line of per-class counts per split, and a warning per rare training class."""
    counts = class_counts(index)
    splits = list(counts)
    rows = ", ".join(f"{name} {'/'.join(str(counts[s][c]) for s in splits)}" for c, name in enumerate(index.classes))
    line = f"images per class ({'/'.join(splits)}): {rows}"
    train = counts.get("train") or next(iter(counts.values()))
    total = sum(train) or 1
    warnings = [
        f"class '{name}' is {n / total:.1%} of the training images (under {RARE_SHARE:.0%}): consider "
        "optim.class_weights=auto or data.balanced_sampler=true, and judge it by F1/AUROC rather than accuracy"
        for name, n in zip(index.classes, train)
        if n / total < RARE_SHARE
    ]
    return line, warnings


def resolve_class_weights(spec: Any, train_counts: Sequence[int], classes: Sequence[str]) -> list[float] | None:
    """``optim.class_weights``: None (unweighted), ``auto`` (inverse frequency, scaled so that a
    balanced set gets weight 1 everywhere: ``N / (C * n_c)``, scikit-learn's "balanced") or one
    positive weight per class, in class-folder order."""
    if spec is None:
        return None
    if spec == "auto":  # the schema allows auto, null or a list
        total = sum(train_counts)
        return [total / (len(train_counts) * n) for n in train_counts]
    weights = list(spec)
    if len(weights) != len(classes) or not all(isinstance(w, (int, float)) and w > 0 for w in weights):
        raise ValueError(
            f"optim.class_weights needs {len(classes)} positive weights (one per class: {', '.join(classes)}), "
            f"got {weights}"
        )
    return [float(w) for w in weights]
