"""Your own folder of images, ``ROOT/<class>/*``: split automatically and recorded in a manifest.

The split is a pure function of the sorted list of image files, ``data.split_sizes`` and
``data.split_seed``: each class's files are sorted, shuffled with the split seed and the class name,
and cut into test, validation and train (in that order, so a larger training count leaves the test
and validation images unchanged). Unreadable files are left out before the cut, so counts are exact.
Near duplicates (``near_duplicates.near_duplicate_groups`` over the hashes the decode check makes)
are cut as whole groups, so no picture is in two splits or folds (the rule: ``carve``); the groups
are listed in ``near_duplicate_groups.json`` beside the manifest and counted in the run's report.
The result is written once to ``<cache>/splits/<digest>/manifest.csv`` (the data root may be
read-only) and read from there on later runs; the digest covers the root, the file list (and whether
it has near duplicates), the sizes, the seed and ``data.folds``, so a changed folder gets a new
split instead of a stale one. A ``ROOT/manifest.csv`` (e.g. the download's) is used as it is.

``data.folds=K`` divides the non-test images into K stratified folds (a manifest's ``fold`` column);
``data.fold=i`` validates on fold i and trains on the others, the test split stays the same.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import posixpath
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, NamedTuple

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.image_folder import DataLayoutError, _not_an_image, root_dirs
from datamodules.image_io import bad_reasons
from datamodules.near_duplicates import MAX_DISTANCE, near_duplicate_groups
from lightning_modules.atomic_io import write_json_atomic, write_text_atomic

MANIFEST = "manifest.csv"
COLUMNS = ("file", "class", "split", "fold")  # the download writes file, class, split, sha256
# Our split names <-> the manifest's (the download's folder names).
TO_MANIFEST = {"train": "train", "val": "validation", "test": "test"}
FROM_MANIFEST = {"train": "train", "validation": "val", "val": "val", "test": "test"}
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
UNSPLIT = "unsplit"  # SplitIndex.skipped key of files left out before the split
GROUPS = "near_duplicate_groups.json"  # beside a split's manifest: the near-duplicate groups it kept whole


@dataclass(frozen=True)
class SplitSpec:
    """How a folder without train/validation/test folders is split (``data.*``)."""

    sizes: tuple[float, ...] = DEFAULT_FRACTIONS
    seed: int = 0
    folds: int | None = None
    fold: int | None = None
    manifest: Path | None = None  # a recorded split to use instead (stage=test: the checkpoint's run)


def split_spec(data: Any, manifest: Path | None = None) -> SplitSpec:
    """The SplitSpec of a config's ``data`` section."""
    sizes = tuple(data.split_sizes) if data.split_sizes is not None else DEFAULT_FRACTIONS
    return SplitSpec(sizes, int(data.split_seed), data.folds, data.fold, manifest)


class Row(NamedTuple):
    file: str  # relative to the data root
    cls: str
    split: str  # train, val or test
    fold: int | None


@dataclass
class Listing:
    """What a layout yields before the shared checks of ``scan_splits``."""

    classes: list[str]
    samples: dict[str, list[tuple[str, int]]]
    bad: dict[str, str]  # path -> why it is not a sample
    split_of: dict[str, str]  # bad path -> the split it is listed under
    checks: dict[str, Any] | None = None  # decode checks already made (flat folders check before the cut)
    fold_of: dict[str, int] = field(default_factory=dict)
    manifest: Path | None = None
    source: str = "folders"  # folders (ROOT/{train,validation,test}/), flat (split here) or manifest

    def where(self, root: Path, split: str) -> str:
        """The place a split's images come from, for error messages."""
        if self.source == "folders":
            return str(root / TO_MANIFEST[split])
        return f"the {split} split of {self.manifest or root}"


# --- sizes ------------------------------------------------------------------------------------


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
        if train < 1 or train + val + test > len(order):
            need = f"{train + val + test} ({train}+{val}+{test})" if kind == "counts" else "at least 3"
            raise DataLayoutError(
                f"class {name!r} has {len(order)} readable image(s), too few for data.split_sizes={list(sizes)} "
                f"(needs {need}); use smaller counts or fractions such as data.split_sizes=[0.8,0.1,0.1]"
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
                f"class {name!r}: its near-duplicate groups leave no image of it for {TO_MANIFEST[empty[0]]} "
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


# --- manifests ----------------------------------------------------------------------------------


def manifest_text(rows: Iterable[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in sorted(rows, key=lambda r: (r.cls, r.file)):
        writer.writerow((row.file, row.cls, TO_MANIFEST[row.split], "" if row.fold is None else row.fold))
    return buffer.getvalue()


def write_manifest(path: Path, rows: Iterable[Row]) -> None:
    """Atomic, and safe when several processes write the same (deterministic) manifest at once."""
    write_text_atomic(path, manifest_text(rows))


def read_manifest(path: Path) -> list[Row]:
    """The rows of a manifest (columns file, class, split; fold optional; others ignored). A file
    outside the root (absolute, or escaping with ``..``) or listed twice (in one split or two) is a
    one-line DataLayoutError naming its line, before any file is read."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"file", "class", "split"} - set(reader.fieldnames or [])
            if missing:
                raise DataLayoutError(f"{path} lacks the column(s) {sorted(missing)}; expected {', '.join(COLUMNS)}")
            rows, first_line = [], {}
            for number, record in enumerate(reader, start=2):
                split = FROM_MANIFEST.get(record["split"].strip())
                fold = (record.get("fold") or "").strip()
                if split is None or not record["file"] or not record["class"] or not (fold == "" or fold.isdigit()):
                    raise DataLayoutError(
                        f"{path} line {number}: needs a file, a class, split train/validation/test and an empty "
                        f"or whole-number fold; got {dict(record)}"
                    )
                file = record["file"]
                if PurePosixPath(file).is_absolute() or PureWindowsPath(file).is_absolute():
                    raise DataLayoutError(
                        f"{path} line {number}: {file!r} is an absolute path; files are listed relative to data.root"
                    )
                # One spelling per file (a/./b.jpg is a/b.jpg), so a file cannot hide in two rows.
                key = posixpath.normpath(file.replace("\\", "/"))
                if key == ".." or key.startswith("../"):
                    raise DataLayoutError(f"{path} line {number}: {file!r} points outside data.root")
                if key in first_line:
                    raise DataLayoutError(
                        f"{path} line {number}: {file!r} is listed again (first on line {first_line[key]}); "
                        "each file may have one row, in one split"
                    )
                first_line[key] = number
                rows.append(Row(file, record["class"], split, int(fold) if fold else None))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataLayoutError(f"cannot read {path}: {err}") from None
    if not rows:
        raise DataLayoutError(f"{path} lists no images")
    return rows


# --- the flat layout --------------------------------------------------------------------------


def list_flat(root: Path) -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    """Class names, the image files of each class (relative to ``root``) and the files that are
    not taken as images (``{path: reason}``)."""
    classes = root_dirs(root)
    files: dict[str, list[str]] = {}
    not_images: dict[str, str] = {}
    for name in classes:
        entries = sorted(e.name for e in os.scandir(root / name) if e.is_file())
        for f in entries:
            if reason := _not_an_image(f):
                not_images[str(root / name / f)] = reason
        files[name] = [f"{name}/{f}" for f in entries if not _not_an_image(f)]
        if not files[name]:
            raise DataLayoutError(
                f"class folder {root / name} has no image files; expected layout: ROOT/<class_name>/<image files>"
            )
    if len(classes) < 2:
        raise DataLayoutError(f"need at least two class folders, found {classes} under {root}")
    return classes, files, not_images


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def _new_rows(clean: dict[str, list[str]], spec: SplitSpec, groups: Sequence[Sequence[str]] = ()) -> list[Row]:
    split_of = carve(clean, spec.sizes, spec.seed, groups)
    fold_of: dict[str, int] = {}
    if spec.folds:
        fold_of = assign_folds(
            ((f, f.split("/")[0]) for f, s in split_of.items() if s != "test"), spec.folds, spec.seed, groups
        )
    return [Row(f, f.split("/")[0], s, fold_of.get(f)) for f, s in split_of.items()]


def kept_together(groups: Sequence[Sequence[str]]) -> dict[str, int]:
    """The near-duplicate groups a split kept whole, in numbers (for metrics.json)."""
    return {"near_duplicate_groups_kept_together": len(groups), "images_in_groups": sum(map(len, groups))}


def _groups_note(counts: dict[str, Any]) -> str:
    n, m = counts.get("near_duplicate_groups_kept_together"), counts.get("images_in_groups")
    return f"; {n} near-duplicate group(s) of {m} images kept in one split each" if n else ""


def read_groups(manifest: Path | None) -> dict[str, Any]:
    """``kept_together`` of the split in ``manifest`` (from its GROUPS file; None where it has
    none: the files were not checked, or the split was made in memory)."""
    try:
        recorded = json.loads((manifest.parent / GROUPS).read_text()) if manifest is not None else {}
        return {key: recorded[key] for key in kept_together(())}
    except (OSError, ValueError, KeyError, TypeError):
        return dict.fromkeys(kept_together(()))


def _write_groups(folder: Path, groups: Sequence[Sequence[str]]) -> None:
    write_json_atomic(folder / GROUPS, kept_together(groups) | {"groups": [list(g) for g in groups]})


def _split_rows(
    root: Path,
    files: dict[str, list[str]],
    clean: dict[str, list[str]],
    spec: SplitSpec,
    cache_dir: str | Path | None,
    checked: bool,
    groups: Sequence[Sequence[str]] = (),
) -> tuple[list[Row], Path | None]:
    """``spec``'s split of the folder and its manifest: read if this exact folder was split with
    these settings before, else written; a changed folder gets a new one, with a warning. Without
    ``cache_dir`` the split is made in memory only (the data root may be read-only). ``groups``:
    near duplicates kept in one split and fold, listed in GROUPS beside the manifest."""
    if cache_dir is None:
        return _new_rows(clean, spec, groups), None
    settings = _digest([str(root.resolve()), list(spec.sizes), spec.seed, spec.folds, checked])
    listing = sorted(f for names in files.values() for f in names)
    # A folder without near duplicates keeps the digest, and the manifest, it had before groups were
    # kept together; one with them gets a new split instead of a cached one that may cut them apart.
    ungrouped = Path(cache_dir) / "splits" / f"{settings}-{_digest(listing)}"
    grouped = Path(cache_dir) / "splits" / f"{settings}-{_digest([listing, 'near-duplicate groups', MAX_DISTANCE])}"
    folder = grouped if groups else ungrouped
    path = folder / MANIFEST
    if path.is_file():
        if checked and not (folder / GROUPS).is_file():  # written before GROUPS existed: it had no groups
            _write_groups(folder, groups)
        rank_zero_info(f"split of {root}: read from {path}{_groups_note(read_groups(path))}")
        return read_manifest(path), path
    earlier = sorted(folder.parent.glob(f"{settings}-*/files.json"), key=lambda p: p.stat().st_mtime)
    if groups and (ungrouped / MANIFEST).is_file():  # this folder's split from before groups were kept whole
        rank_zero_warn(
            f"{root} has {len(groups)} near-duplicate group(s): a new split that keeps each in one split is "
            f"written to {path}; results are not comparable with runs on the old one ({ungrouped})"
        )
    elif earlier:
        before = set(json.loads(earlier[-1].read_text()))
        added, removed = len(set(listing) - before), len(before - set(listing))
        rank_zero_warn(
            f"{root} changed since its last split ({added} file(s) added, {removed} removed): a new split is "
            f"written to {path}; results are not comparable with runs on the old one ({earlier[-1].parent})"
        )
    rows = _new_rows(clean, spec, groups)
    write_json_atomic(folder / "files.json", listing)
    if checked:  # unchecked files have no hashes: their groups are unknown, not none
        _write_groups(folder, groups)
    write_manifest(path, rows)
    rank_zero_info(
        f"split of {root}: {len(rows)} images written to {path} (data.split_sizes={list(spec.sizes)})"
        f"{_groups_note(kept_together(groups))}"
    )
    return rows, path


def flat_listing(
    root: Path,
    splits: Sequence[str],
    spec: SplitSpec,
    cache_dir: str | Path | None,
    scan: Callable[[list[str]], dict[str, Any]],
    checked: bool,
) -> Listing:
    """The samples of ``splits`` for a root without train/validation/test folders: from
    ``spec.manifest``, else ``ROOT/manifest.csv``, else the automatic split (see the module
    docstring). ``scan`` decodes files (``{path: Check}``; empty without the decode check)."""
    recorded, rows = root / MANIFEST, None
    if spec.manifest is not None and spec.manifest.is_file():
        candidate = read_manifest(spec.manifest)
        gone = [r.file for r in candidate if not (root / r.file).is_file()]
        if not gone:
            recorded, rows = spec.manifest, candidate  # read and checked: not again below
        else:  # the checkpoint was trained on other data: it cannot say which of these images are test
            rank_zero_warn(
                f"{spec.manifest} lists {len(gone)} file(s) missing under {root} (e.g. {gone[0]}): "
                f"the split of {root} is made from data.split_sizes and data.split_seed instead"
            )
    checks, bad = None, {}
    if rows is not None or recorded.is_file():
        manifest, source = recorded, "manifest"
        if rows is None:
            rows = read_manifest(manifest)
            missing = [r.file for r in rows if not (root / r.file).is_file()]
            if missing:
                raise DataLayoutError(
                    f"{manifest} lists {len(missing)} file(s) missing under {root}, e.g. {missing[0]}; "
                    "fix or remove the manifest"
                )
        in_folders = {f"{name}/{e.name}" for name in root_dirs(root) for e in os.scandir(root / name) if e.is_file()}
        unused = {f for f in in_folders if not _not_an_image(f.rsplit("/", 1)[1])} - {r.file for r in rows}
        if unused:
            rank_zero_warn(f"{len(unused)} image file(s) under {root} are not in {manifest} and are not used")
        classes = sorted({r.cls for r in rows})
    else:
        classes, files, bad = list_flat(root)
        checks = scan([str(root / f) for names in files.values() for f in names])
        bad |= bad_reasons(checks)
        clean = {name: [f for f in names if str(root / f) not in bad] for name, names in files.items()}
        # The scan's hashes (decoded once, remembered in the scan memory): nothing is hashed again.
        hashes = {f: checks[str(root / f)].dhash for names in clean.values() for f in names if str(root / f) in checks}
        groups = near_duplicate_groups({f: h for f, h in hashes.items() if h is not None})
        rows, manifest = _split_rows(root, files, clean, spec, cache_dir, checked, groups)
        source = "flat"
    label = {name: i for i, name in enumerate(classes)}
    samples = {
        split: sorted(
            ((str(root / r.file), label[r.cls]) for r in rows if r.split == split), key=lambda s: (s[1], s[0])
        )
        for split in splits
    }
    fold_of = {str(root / r.file): r.fold for r in rows if r.fold is not None and r.split != "test"}
    return Listing(classes, samples, bad, dict.fromkeys(bad, UNSPLIT), checks, fold_of, manifest, source)


def apply_folds(listing: Listing, spec: SplitSpec) -> Listing:
    """Validation = fold ``spec.fold`` of the non-test images, training = the other folds; the
    folds come from the manifest's ``fold`` column where it has one for every non-test image."""
    if not spec.folds or not {"train", "val"} <= set(listing.samples):
        return listing
    pool = listing.samples["train"] + listing.samples["val"]
    fold_of = listing.fold_of
    if not fold_of or any(path not in fold_of for path, _ in pool):
        fold_of = assign_folds(((p, listing.classes[label]) for p, label in pool), spec.folds, spec.seed)
    elif max(fold_of.values()) + 1 != spec.folds:
        raise DataLayoutError(
            f"{listing.manifest} numbers {max(fold_of.values()) + 1} folds in its fold column, "
            f"but data.folds={spec.folds}"
        )
    samples = dict(listing.samples)
    samples["val"] = sorted((s for s in pool if fold_of[s[0]] == spec.fold), key=lambda s: (s[1], s[0]))
    samples["train"] = sorted((s for s in pool if fold_of[s[0]] != spec.fold), key=lambda s: (s[1], s[0]))
    listing.samples, listing.fold_of = samples, {p: fold_of[p] for p, _ in pool}
    return listing


def run_manifest(index: Any) -> str:
    """The exact split a run used (after skips and subsets), for ``manifest.csv`` in its folder."""
    rows = []
    for split, samples in index.samples.items():
        for path, label in samples:
            rel = os.path.relpath(path, index.root).replace(os.sep, "/")
            rows.append(Row(rel, index.classes[label], split, index.folds.get(path)))
    return manifest_text(rows)


def record_split(index: Any, run_dir: Path, spec: SplitSpec) -> dict[str, Any] | None:
    """Write the run's exact split to ``run_dir/manifest.csv`` (global rank zero) when it is not
    visible as folders (a flat folder, a manifest, folds); returns its summary for metrics.json."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if index.source == "folders" and not index.folds:
        return None
    path = run_dir / MANIFEST
    if rank_zero_only.rank == 0:
        write_text_atomic(path, run_manifest(index))
    summary: dict[str, Any] = {"source": index.source, "from": str(index.manifest) if index.manifest else None}
    if index.source == "flat":
        summary |= {"split_sizes": list(spec.sizes), "split_seed": spec.seed} | read_groups(index.manifest)
    if index.folds:
        summary |= {"folds": spec.folds, "fold": spec.fold}
    return summary | {"manifest": str(path)}
