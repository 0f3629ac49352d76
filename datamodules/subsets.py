"""Learning curves: a nested, seeded subset of the training images (``data.train_per_class``)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from datamodules.data_index import SplitIndex
from datamodules.layout import DataLayoutError


def train_subset(index: SplitIndex, per_class: int, seed: int) -> SplitIndex:
    """``index`` with ``per_class`` training images of each class; validation and test untouched.

    Each class's images are put in a seeded order that does not depend on ``per_class`` and the
    first ``per_class`` are taken, so the subset for 50 is inside the subset for 100 (a sweep over
    ``per_class`` is a data-efficiency curve, not a series of unrelated samples)."""
    by_class: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for sample in index.samples["train"]:
        by_class[sample[1]].append(sample)
    chosen: list[tuple[str, int]] = []
    for label, name in enumerate(index.classes):
        items = sorted(by_class[label])
        if len(items) < per_class:
            raise DataLayoutError(
                f"data.train_per_class={per_class}, but class '{name}' has only {len(items)} readable training "
                "images; use a smaller number"
            )
        order = np.random.default_rng([seed, label]).permutation(len(items))
        chosen += [items[i] for i in order[:per_class]]
    return dataclasses.replace(index, samples={**index.samples, "train": sorted(chosen, key=lambda s: (s[1], s[0]))})
