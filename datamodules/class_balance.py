"""Class imbalance: per-class counts, a warning for rare classes, loss weights from the counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datamodules.data_index import SplitIndex

# A class is rare when it has under a quarter of the mean images per class, i.e. a share under
# 1 / (4 * num_classes): relative, so 200 balanced classes (0.5% each) are not rare, while two classes
# warn under 12.5%. A quarter is where class weights or a balanced sampler start to matter (the
# class then weighs under a quarter of an average one in the loss).
RARE_FRACTION_OF_MEAN = 0.25
SHOWN_RARE = 5  # the warning names this many of the rarest classes


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
    """One line of per-class counts per split, and at most one warning: the rare training classes
    (see ``RARE_FRACTION_OF_MEAN``), the rarest named."""
    counts = class_counts(index)
    splits = list(counts)
    rows = ", ".join(f"{name} {'/'.join(str(counts[s][c]) for s in splits)}" for c, name in enumerate(index.classes))
    line = f"images per class ({'/'.join(splits)}): {rows}"
    train = counts.get("train") or next(iter(counts.values()))
    total = sum(train) or 1
    mean = total / len(train)
    rare = sorted((n, name) for name, n in zip(index.classes, train) if n < RARE_FRACTION_OF_MEAN * mean)
    if not rare:
        return line, []
    shown = ", ".join(f"'{name}' {n} ({100 * n / total:.2g}%)" for n, name in rare[:SHOWN_RARE])
    more = f" and {len(rare) - SHOWN_RARE} more" if len(rare) > SHOWN_RARE else ""
    warning = (
        f"{len(rare)} of {len(train)} classes have under a quarter of the mean share of the training images "
        f"(mean {100 / len(train):.2g}%): {shown}{more}; consider optim.class_weights=auto or "
        "data.balanced_sampler=true, and judge them by F1/AUROC rather than accuracy"
    )
    return line, [warning]


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
