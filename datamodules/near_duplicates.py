"""Near-duplicate images across splits (leakage between training and evaluation).

The hash is a 64-bit difference hash (dHash): the picture in grayscale, shrunk to 9 x 8 (Lanczos,
which weights pixels smoothly, so a slight crop moves little weight between cells: on the shared
photos it finds 94% of 1%-cropped copies within 4 bits where box averaging finds 76%), one bit per
horizontally adjacent pair (is the right cell brighter?). It is written here rather than taken from
``imagededup``, which would add scikit-learn, PyWavelets, matplotlib and a compiled extension for
what is five lines, and would decode every file again at full size; this hash is computed from the
reduced-scale decode the pre-training scan does anyway and is remembered with its verdict. dHash
survives resizing, recompression and brightness changes (it only sees coarse gradients); it does
not see through larger crops (5%: found 16% of the time) or rotations.

Candidate pairs are found with the pigeonhole principle instead of comparing every pair: split
the 64 bits into ``max_distance + 1`` chunks; two hashes that differ in at most ``max_distance``
bits agree exactly on at least one chunk. Hashes are bucketed by each chunk and only the members
of a bucket are compared (XOR + popcount, vectorised), far fewer than all pairs.

``near_duplicate_groups`` uses the same buckets for every pair within one folder, and joins the
pairs into groups (connected components), which an automatic split keeps in one split and fold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

# Hamming distance (of 64 bits) at or below which two pictures count as one. Measured on the 4,000
# shared cats-and-dogs photos: the closest two distinct photos in different splits differ in 7 bits
# (a handful at 8-9, then counts grow ~3x per bit), while re-encoded, half- or double-size,
# brightened or 1%-cropped copies of 200 of them are within 5 bits 98.5-100% of the time (2% crops:
# 90%). 5 keeps a 2-bit margin below the first false match.
MAX_DISTANCE = 5
HASH_NAME = "dHash 64-bit"
# Split order for "earlier" and "later" (see cross_split_pairs); other names sort after these.
SPLIT_ORDER = ("train", "val", "validation", "test")
_BLOCK = 1 << 21  # hash comparisons per vectorised step (bounds the memory of a large bucket)


class NearDuplicate(NamedTuple):
    """A picture in a later split (``file_b``) and its closest near duplicate in an earlier one."""

    split_a: str
    file_a: str
    split_b: str
    file_b: str
    distance: int


def dhash(image: Image.Image) -> int:
    """The 64-bit difference hash of ``image`` (any mode, any size)."""
    small = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = small[:, 1:] > small[:, :-1]
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def split_rank(split: str) -> int:
    return SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER)


def cross_split_pairs(
    hashes_by_split: Mapping[str, Sequence[tuple[str, int]]], max_distance: int = MAX_DISTANCE
) -> list[NearDuplicate]:
    """Every picture that has a near duplicate (Hamming distance <= ``max_distance``) in an
    earlier split (train, then validation, then test; other names in the given order after
    those), paired with the closest such picture (ties: the first in the given order).

    One row per later picture, not every pair: ``k`` copies of a picture in two splits give
    ``k`` rows, not ``k * k``, so the listing stays as long as the data set at most."""
    _check_distance(max_distance)
    splits = sorted(hashes_by_split, key=split_rank)  # stable: unknown names keep their order
    paths = [path for split in splits for path, _ in hashes_by_split[split]]
    if not paths:
        return []
    hashes = np.fromiter((h for split in splits for _, h in hashes_by_split[split]), dtype=np.uint64, count=len(paths))
    ranks = np.repeat(np.arange(len(splits)), [len(hashes_by_split[split]) for split in splits])
    best_distance = np.full(len(paths), max_distance + 1, dtype=np.int64)
    best_match = np.full(len(paths), -1, dtype=np.int64)
    for shift, width in _chunks(max_distance):
        keys = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")  # a bucket's members stay in index order
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            members = order[start:end]
            if ranks[members[0]] != ranks[members[-1]]:  # ascending indices: first/last span the splits
                _compare_bucket(members, hashes, ranks, best_distance, best_match)
    found = np.flatnonzero(best_match >= 0)
    split_of = [split for split in splits for _ in hashes_by_split[split]]
    return [
        NearDuplicate(split_of[j], paths[j], split_of[i], paths[i], int(best_distance[i]))
        for i, j in zip(found.tolist(), best_match[found].tolist())
    ]


def near_duplicate_groups(hashes: Mapping[str, int], max_distance: int = MAX_DISTANCE) -> list[list[str]]:
    """The groups of near duplicates among ``{path: hash}``: pictures within ``max_distance`` bits
    are joined, and so are chains of them (a~b and b~c put a, b and c in one group even where a
    and c differ more: a split that kept only the pairs together could not keep all three).
    Groups of two or more only, each sorted, sorted by their first path."""
    _check_distance(max_distance)
    paths = sorted(hashes)
    if len(paths) < 2:
        return []
    values = np.fromiter((hashes[p] for p in paths), dtype=np.uint64, count=len(paths))
    # Identical hashes are joined outright: k copies then cost one comparison, not k * k.
    unique, inverse = np.unique(values, return_inverse=True)
    parent = list(range(len(unique)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps chains short
            i = parent[i]
        return i

    for shift, width in _chunks(max_distance):
        keys = (unique >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            for a, b in _close_pairs(order[start:end], unique, max_distance):
                root_a, root_b = find(a), find(b)
                if root_a != root_b:
                    parent[max(root_a, root_b)] = min(root_a, root_b)
    members: dict[int, list[str]] = {}
    for path, i in zip(paths, inverse.reshape(-1).tolist()):
        members.setdefault(find(i), []).append(path)
    return sorted((group for group in members.values() if len(group) > 1), key=lambda group: group[0])


def _close_pairs(members: np.ndarray, hashes: np.ndarray, max_distance: int) -> list[tuple[int, int]]:
    """The pairs ``(i, j)``, ``i < j`` in bucket order, of one bucket's members within ``max_distance``."""
    pairs: list[tuple[int, int]] = []
    step = max(1, _BLOCK // len(members))
    for at in range(0, len(members), step):
        block = members[at : at + step]
        distance = np.bitwise_count(hashes[block][:, None] ^ hashes[members][None, :])
        rows, columns = np.nonzero(distance <= max_distance)
        later = columns > rows + at  # each pair once, never a hash with itself
        pairs += zip(block[rows[later]].tolist(), members[columns[later]].tolist())
    return pairs


def _check_distance(max_distance: int) -> None:
    if not 0 <= max_distance <= 32:
        raise ValueError(f"max_distance must be between 0 and 32 bits, not {max_distance}")


def _chunks(max_distance: int) -> list[tuple[int, int]]:
    """``max_distance + 1`` (shift, width) bit ranges covering the 64 bits, nearly equal widths."""
    n = max_distance + 1
    widths = [64 // n + (1 if i < 64 % n else 0) for i in range(n)]
    return [(sum(widths[:i]), w) for i, w in enumerate(widths)]


def _compare_bucket(
    members: np.ndarray, hashes: np.ndarray, ranks: np.ndarray, best_distance: np.ndarray, best_match: np.ndarray
) -> None:
    """Update each later-split member's closest earlier-split member within one bucket."""
    columns = members  # candidates for "earlier": any member, masked by rank below
    rows = members[ranks[members] > ranks[members[0]]]
    step = max(1, _BLOCK // len(columns))
    for at in range(0, len(rows), step):
        block = rows[at : at + step]
        distance = np.bitwise_count(hashes[block][:, None] ^ hashes[columns][None, :]).astype(np.int64)
        distance[ranks[columns][None, :] >= ranks[block][:, None]] = 65  # same or later split: never a match
        nearest = distance.argmin(axis=1)  # first of the closest: the lowest index
        closest = distance[np.arange(len(block)), nearest]
        match = columns[nearest]
        better = (closest < best_distance[block]) | ((closest == best_distance[block]) & (match < best_match[block]))
        best_distance[block[better]] = closest[better]
        best_match[block[better]] = match[better]


def evaluation_drops(pairs: Sequence[NearDuplicate]) -> dict[str, set[str]]:
    """The pictures ``data.drop_near_duplicates`` removes: the later member of each pair, i.e. the
    validation or test picture (test's when the pair is validation-test: the test score must not
    rest on pictures that model selection has seen). Training pictures are never removed."""
    drops: dict[str, set[str]] = {}
    for pair in pairs:
        if pair.split_b != "train":
            drops.setdefault(pair.split_b, set()).add(pair.file_b)
    return drops


def tsv_text(pairs: Sequence[NearDuplicate]) -> str:
    """The listing ``near_duplicates.tsv``: columns split_a, file_a, split_b, file_b, distance."""
    header = "split_a\tfile_a\tsplit_b\tfile_b\tdistance\n"
    return header + "".join(f"{p.split_a}\t{p.file_a}\t{p.split_b}\t{p.file_b}\t{p.distance}\n" for p in pairs)
