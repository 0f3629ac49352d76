"""The seeded, stratified cut of a folder of class folders into splits and folds.

A pure function of the sorted file lists, the sizes and the seed (see ``datamodules.flat_folder``
for where its input comes from and where the result is recorded): each class's files are sorted,
shuffled with the seed and the class name, and cut into test, validation and train in that order,
so a larger training count leaves the test and validation images unchanged. Near-duplicate groups
(``near_duplicates.near_duplicate_groups``) are placed whole, so no picture is in two splits or folds.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from datamodules.layout import SPLIT_DIRS, DataLayoutError


def parse_split_sizes(sizes: Sequence[float]) -> tuple[str, tuple[float, ...]]:
    """``("counts", (train, val, test))`` or ``("fractions", ...)``; ValueError with a one-line message."""
    values = tuple(sizes)
    ok_counts = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
    ok_fractions = all(isinstance(v, float) and 0 < v < 1 for v in values) and sum(values) <= 1 + 1e-9
    if len(values) == 3 and (ok_counts or ok_fractions):
        return ("counts" if ok_counts else "fractions"), values
    raise ValueError(
        "data.split_sizes must be three whole numbers >= 1 (images per class for train, validation, test) "
        f"or three fractions in (0, 1) that sum to at most 1, e.g. [0.8,0.1,0.1]; got {list(values)}"
    )


def _round(x: float) -> int:
    return math.floor(x + 0.5 + 1e-9)  # halves round up; 1e-9 absorbs float error (0.7 * 5 = 3.4999...)


def class_counts(n: int, sizes: Sequence[float]) -> tuple[int, int, int]:
    """(train, validation, test) images of a class of ``n``: counts as given; fractions give
    validation and test ``round(f * n)`` (halves up, at least one) and train the rest of the class
    (or ``round(f * n)`` when the fractions sum to less than 1)."""
    kind, values = parse_split_sizes(sizes)
    if kind == "counts":
        return int(values[0]), int(values[1]), int(values[2])
    val, test = max(1, _round(values[1] * n)), max(1, _round(values[2] * n))
    train = n - val - test if sum(values) >= 1 - 1e-9 else _round(values[0] * n)
    return train, val, test


def _fits(n: int, sizes: Sequence[float]) -> bool:
    """Whether a class of ``n`` images can be cut by ``sizes`` (an image for each split)."""
    train, val, test = class_counts(n, sizes)
    return train >= 1 and train + val + test <= n


def _sizes_hint(files_by_class: Mapping[str, Sequence[str]], sizes: Sequence[float]) -> str:
    """Advice for sizes that do not fit every class: sizes checked to fit them all (the given counts
    shrunk to the smallest class, or the default fractions), or why none can."""
    name, smallest = min(((name, len(files)) for name, files in files_by_class.items()), key=lambda c: (c[1], c[0]))
    if smallest < 3:
        return f"every split needs an image of each class, so add images to class {name!r} or remove its folder"
    kind, values = parse_split_sizes(sizes)
    candidates = [(0.8, 0.1, 0.1)]
    if kind == "counts":  # validation and test kept where they fit, training takes the rest
        val, test = (max(1, min(int(v), (smallest - 1) // 3)) for v in values[1:])
        candidates.insert(0, (min(int(values[0]), smallest - val - test), val, test))
    fitting = next(c for c in candidates if all(_fits(len(f), c) for f in files_by_class.values()))
    return (
        f"e.g. data.split_sizes=[{','.join(f'{v:g}' for v in fitting)}] fits every class "
        f"(the smallest, {name!r}, has {smallest})"
    )


OUT = ""  # carve's place for the images the sizes leave out (counts, or fractions summing to less than 1)


def _units(
    order: list[str], group_of: dict[str, int], groups: Sequence[Sequence[str]], done: Mapping[str, object]
) -> list[list[str]]:
    """``order`` (one class, shuffled) as the units a cut places whole: a group at the place of its
    first member, with its members of this class; files already in ``done`` (their group was placed
    with another class) are left out."""
    units, seen, here = [], set(), set(order)
    for file in order:
        if file in done:
            continue
        group = group_of.get(file)
        if group is None:
            units.append([file])
        elif group not in seen:
            seen.add(group)
            units.append([f for f in groups[group] if f in here])
    return units


def carve(
    files_by_class: dict[str, list[str]],
    sizes: Sequence[float],
    seed: int,
    groups: Sequence[Sequence[str]] = (),
) -> dict[str, str]:
    """``{file: split}`` for a stratified, seeded split (see the module docstring) that keeps each of
    ``groups`` (near duplicates, ``near_duplicates.near_duplicate_groups``) in one split.

    The rule: each class's shuffled files are walked as units, a group at the place of its first
    member and counted as its size, and each unit goes to the first of test, validation, train and
    "left out" (the cut order) that has room for all of it. A unit that fits nowhere goes to train,
    or is left out where the sizes leave images out. Without groups every unit is one file and this
    is exactly the plain cut. With them a split ends short only when every unit after its last free
    place is a group larger than the places left (train or "left out" takes it); a group's members
    in other classes (one picture filed twice) go with it and count against their own class's room,
    which they may exceed. Every split keeps an image of each class, or the cut is a DataLayoutError."""
    kind, _ = parse_split_sizes(sizes)
    known = {file for files in files_by_class.values() for file in files}
    groups = [[f for f in group if f in known] for group in groups]
    group_of = {file: i for i, group in enumerate(groups) for file in group}
    placed: dict[str, str] = {}
    for name, files in sorted(files_by_class.items()):
        order = sorted(files)
        random.Random(f"{seed}:{name}").shuffle(order)
        train, val, test = class_counts(len(order), sizes)
        if not _fits(len(order), sizes):
            if kind == "counts":
                need = f"needs {train + val + test} ({train}+{val}+{test})"
            else:
                need = "needs at least 3" if len(order) < 3 else f"{train} left for training"
            raise DataLayoutError(
                f"class {name!r} has {len(order)} readable image(s), too few for data.split_sizes={list(sizes)} "
                f"({need}); {_sizes_hint(files_by_class, sizes)}"
            )
        room = {"test": test, "val": val, "train": train, OUT: len(order) - train - val - test}
        for file in order:
            if file in placed:  # placed with its group from an earlier class
                room[placed[file]] -= 1
        overflow = OUT if train + val + test < len(order) else "train"
        for unit in _units(order, group_of, groups, placed):
            split = next((s for s in ("test", "val", "train", OUT) if room[s] >= len(unit)), overflow)
            room[split] -= len(unit)
            members = groups[group_of[unit[0]]] if unit[0] in group_of else unit
            placed |= dict.fromkeys(members, split)
        empty = [s for s in ("train", "val", "test") if not any(placed[f] == s for f in order)]
        if empty:
            raise DataLayoutError(
                f"class {name!r}: its near-duplicate groups leave no image of it for {SPLIT_DIRS[empty[0]]} "
                f"with data.split_sizes={list(sizes)}; use larger sizes or remove duplicate photos"
            )
    return {file: split for file, split in placed.items() if split != OUT}


def assign_folds(
    pool: Iterable[tuple[str, str]], folds: int, seed: int, groups: Sequence[Sequence[str]] = ()
) -> dict[str, int]:
    """``{file: fold}`` for ``(file, class)`` pairs: each class shuffled (seeded) and dealt round
    robin, continuing where the previous class stopped, so folds differ by at most one image
    overall and per class. Each of ``groups`` (near duplicates) is dealt whole, counted as its size,
    at the place of its first member: every unit goes to the fold with the fewest images of its
    class, then the fewest overall, then the next in the round (without groups: plain round robin),
    which leaves folds apart by about a group's size."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for file, name in pool:
        by_class[name].append(file)
    in_pool = {file for files in by_class.values() for file in files}
    groups = [[f for f in group if f in in_pool] for group in groups]
    group_of = {file: i for i, group in enumerate(groups) for file in group}
    out: dict[str, int] = {}
    total, turn = [0] * folds, 0
    for name, files in sorted(by_class.items()):
        if len(files) < folds:
            raise DataLayoutError(
                f"class {name!r} has {len(files)} non-test image(s), fewer than data.folds={folds}: "
                "every fold needs one of each class"
            )
        order = sorted(files)
        random.Random(f"{seed}:{name}:folds").shuffle(order)
        mine = [0] * folds
        for file in order:
            if file in out:  # dealt with its group from an earlier class
                mine[out[file]] += 1
        for unit in _units(order, group_of, groups, out):
            fold = min(range(folds), key=lambda k: (mine[k], total[k], (k - turn) % folds))
            members = groups[group_of[unit[0]]] if unit[0] in group_of else unit
            out |= dict.fromkeys(members, fold)
            mine[fold] += len(unit)
            total[fold] += len(members)
            turn = (fold + 1) % folds
        if min(mine) == 0:
            raise DataLayoutError(
                f"class {name!r}: its near-duplicate groups leave fold {mine.index(0)} of data.folds={folds} "
                "without an image of it; use fewer folds or remove duplicate photos"
            )
    return out
