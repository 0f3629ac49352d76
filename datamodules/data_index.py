"""The data index: every split's checked ``(path, label)`` samples, from whichever layout the data
root has (see ``datamodules.layout``): ROOT/{train,validation,test}/<class>/ is listed here, a
folder of class folders is split by ``datamodules.flat_folder``."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from datamodules.flat_folder import apply_folds, flat_listing
from datamodules.image_io import Check, bad_reasons, scan_files
from datamodules.layout import (
    LAYOUT,
    SPLIT_DIRS,
    DataLayoutError,
    Listing,
    SplitSpec,
    class_dirs,
    data_layout,
    folder_files,
    not_an_image,
)
from datamodules.near_duplicates import HASH_NAME, MAX_DISTANCE, NearDuplicate, cross_split_pairs, evaluation_drops


@dataclass(frozen=True)
class SplitIndex:
    """Class names and the ``(path, label)`` samples of each split, sorted for determinism;
    ``skipped`` lists the unreadable files left out of each split, with the reason;
    ``near_duplicates`` the pictures that have a near duplicate in an earlier split (see
    ``datamodules.near_duplicates``), and ``dropped`` those removed from validation and test."""

    root: Path
    classes: list[str]
    samples: dict[str, list[tuple[str, int]]]
    skipped: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    near_duplicates: list[NearDuplicate] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    near_duplicate_distance: int = MAX_DISTANCE  # the distance the check used (for the report)
    folds: dict[str, int] = field(default_factory=dict)  # path -> fold of training/validation (data.folds)
    manifest: Path | None = None  # the split manifest the samples were read from (flat folders)
    source: str = "folders"  # folders, flat (split automatically) or manifest (ROOT/manifest.csv)

    def counts(self) -> dict[str, int]:
        return {split: len(s) for split, s in self.samples.items()}

    def near_duplicate_summary(self) -> dict[str, int | str]:
        """The near-duplicate check in numbers (for metrics.json)."""
        return {
            "pairs": len(self.near_duplicates),
            "dropped": sum(len(files) for files in self.dropped.values()),
            "max_distance": self.near_duplicate_distance,
            "hash": HASH_NAME,
        }


def folder_listing(root: Path, splits: Sequence[str]) -> Listing:
    """The samples of ROOT/{train,validation,test}/<class>/ (classes must agree across splits)."""
    classes_by_split: dict[str, list[str]] = {}
    for split in splits:
        split_dir = root / SPLIT_DIRS[split]
        classes_by_split[split] = class_dirs(split_dir)
        if not classes_by_split[split]:
            raise DataLayoutError(f"no class folders in {split_dir}; {LAYOUT}")
    reference_split = splits[0]
    classes = classes_by_split[reference_split]
    for split, names in classes_by_split.items():
        if names != classes:
            raise DataLayoutError(
                f"classes differ between splits: {SPLIT_DIRS[reference_split]}/ has {classes}, "
                f"{SPLIT_DIRS[split]}/ has {names} (under {root})"
            )
    if len(classes) < 2:
        raise DataLayoutError(f"need at least two class folders, found {classes} under {root}")
    samples: dict[str, list[tuple[str, int]]] = {}
    bad: dict[str, str] = {}  # path -> why it is left out
    split_of: dict[str, str] = {}
    for split in splits:
        items = []
        for label, name in enumerate(classes):
            class_dir = root / SPLIT_DIRS[split] / name
            prefix = str(class_dir) + os.sep  # string joins: a Path per file costs more than the stat
            names, problems = folder_files(class_dir)
            for f in names + sorted(problems):
                if reason := not_an_image(f) or problems.get(f):
                    bad[prefix + f] = reason
                    split_of[prefix + f] = split
            files = [f for f in names if not not_an_image(f)]
            if not files:
                raise DataLayoutError(f"class folder {class_dir} has no image files; {LAYOUT}")
            items += [(prefix + f, label) for f in files]
        samples[split] = items
    return Listing(classes, samples, bad, split_of)


def scan_memory_path(cache_dir: str | Path, root: Path) -> Path:
    """The remembered decode checks of one data root (see ``image_io.scan_files``)."""
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"scan-{digest}.json"


def scan_splits(
    root: str | Path,
    splits: Sequence[str] = ("train", "val", "test"),
    skip_bad_files: bool = True,
    threads: int = 4,
    cache_dir: str | Path | None = None,
    drop_near_duplicates: bool = False,
    split: SplitSpec | None = None,
) -> SplitIndex:
    """List the images of each split, from ROOT/{train,validation,test}/<class>/ or, for a root
    of class folders, from its split manifest (see ``datamodules.flat_folder``, ``split``: the
    sizes, seed and folds); ``split.folds`` re-divides training and validation into folds.

    Every image is decoded once: unreadable ones are left out and listed in
    ``SplitIndex.skipped`` (or, with ``skip_bad_files=False``, raise a DataLayoutError), and the
    pictures with a near duplicate in an earlier split are listed in ``SplitIndex.near_duplicates``
    (``drop_near_duplicates``: and removed from validation and test; training is never changed).
    With ``cache_dir`` the checks are remembered there, so unchanged files are not decoded again
    (and a flat folder's split is kept there)."""
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"data.root={root} does not exist; {LAYOUT}")
    spec = split or SplitSpec()
    memory = scan_memory_path(cache_dir, root) if cache_dir is not None else None

    def scan(paths: list[str]) -> dict[str, Check]:
        return scan_files(paths, threads, memory)

    layout = data_layout(root, splits)
    if layout == "none":
        raise DataLayoutError(f"no split folders and no class folders of images under {root}; {LAYOUT}")
    if layout == "folders":
        listing = folder_listing(root, splits)
    else:
        listing = flat_listing(root, splits, spec, cache_dir, scan)
    listing = apply_folds(listing, spec)
    classes, samples, bad = listing.classes, listing.samples, dict(listing.bad)
    # one scan per call: the scan memory keeps the files of its last call only
    checks = listing.checks if listing.checks is not None else scan([p for s in samples.values() for p, _ in s])
    bad |= bad_reasons(checks)
    hashes = {path: check.dhash for path, check in checks.items() if check.dhash is not None}
    strict_bad = {p: r for p, r in bad.items() if r != "hidden file"}  # OS litter is never an error
    if strict_bad and not skip_bad_files:
        first = "; ".join(f"{path} ({reason})" for path, reason in list(strict_bad.items())[:3])
        raise DataLayoutError(f"{len(strict_bad)} bad file(s), e.g. {first} (data.skip_bad_files=false)")
    pairs = cross_split_pairs({split: [(p, hashes[p]) for p, _ in samples[split] if p in hashes] for split in splits})
    dropped = evaluation_drops(pairs) if drop_near_duplicates else {}
    split_of = listing.split_of | {path: split for split, items in samples.items() for path, _ in items}
    skipped: dict[str, list[tuple[str, str]]] = {s: [] for s in (*splits, *sorted(set(listing.split_of.values())))}
    for path, reason in bad.items():
        if split_of.get(path) in skipped:
            skipped[split_of[path]].append((path, reason))
    skipped = {s: sorted(items) for s, items in skipped.items() if items or s in splits}
    for split in splits:
        gone = dropped.get(split, set())
        samples[split] = [(path, label) for path, label in samples[split] if path not in bad and path not in gone]
        missing = set(range(len(classes))) - {label for _, label in samples[split]}
        if missing:
            names = [classes[i] for i in sorted(missing)]
            why = " left after dropping near duplicates (data.drop_near_duplicates=true)" if gone else ""
            raise DataLayoutError(f"no readable images for class(es) {names} in {listing.where(root, split)}{why}")
    return SplitIndex(
        root,
        classes,
        samples,
        skipped=skipped,
        near_duplicates=pairs,
        dropped={split: sorted(files) for split, files in dropped.items()},
        folds=listing.fold_of if spec.folds else {},
        manifest=listing.manifest,
        source=listing.source,
    )
