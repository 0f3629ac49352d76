"""Your own folder of images, ``ROOT/<class>/*``: split automatically and recorded in a manifest.

The split is a pure function of the sorted list of image files, ``data.split_sizes`` and
``data.split_seed``: each class's files are sorted, shuffled with the split seed and the class name,
and cut into test, validation and train (in that order, so a larger training count leaves the test
and validation images unchanged). Unreadable files are left out before the cut, so counts are exact.
Near duplicates (``near_duplicates.near_duplicate_groups`` over the hashes the decode check makes)
are cut as whole groups, so no picture is in two splits or folds (the rule:
``stratified_split.carve``); the groups are listed in ``near_duplicate_groups.json`` beside the
manifest and counted in the run's report.
The result is written once to ``<cache>/splits/<digest>/manifest.csv`` (the data root may be
read-only) and read from there on later runs; the digest covers the root, the file list (and whether
it has near duplicates), the sizes, the seed and ``data.folds``, so a changed folder gets a new
split instead of a stale one. A ``ROOT/manifest.csv`` (e.g. the download's) is used as it is.

``data.folds=K`` divides the non-test images into K stratified folds (a manifest's ``fold`` column);
``data.fold=i`` validates on fold i and trains on the others, the test split stays the same.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from core.atomic_io import write_json_atomic
from datamodules.image_io import bad_reasons
from datamodules.layout import (
    MANIFEST,
    DataLayoutError,
    Listing,
    SplitSpec,
    folder_files,
    not_an_image,
    root_dirs,
)
from datamodules.manifest import GROUPS, Row, kept_together, read_groups, read_manifest, write_groups, write_manifest
from datamodules.near_duplicates import MAX_DISTANCE, near_duplicate_groups
from datamodules.stratified_split import assign_folds, carve

UNSPLIT = "unsplit"  # SplitIndex.skipped key of files left out before the split


def list_flat(root: Path) -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    """Class names, the image files of each class (relative to ``root``) and the files that are
    not taken as images (``{path: reason}``)."""
    classes = root_dirs(root)
    files: dict[str, list[str]] = {}
    not_images: dict[str, str] = {}
    for name in classes:
        entries, problems = folder_files(root / name)
        for f in entries + sorted(problems):
            if reason := not_an_image(f) or problems.get(f):
                not_images[str(root / name / f)] = reason
        files[name] = [f"{name}/{f}" for f in entries if not not_an_image(f)]
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


def _groups_note(counts: dict[str, Any]) -> str:
    n, m = counts.get("near_duplicate_groups_kept_together"), counts.get("images_in_groups")
    return f"; {n} near-duplicate group(s) of {m} images kept in one split each" if n else ""


def _split_rows(
    root: Path,
    files: dict[str, list[str]],
    clean: dict[str, list[str]],
    spec: SplitSpec,
    cache_dir: str | Path | None,
    groups: Sequence[Sequence[str]] = (),
) -> tuple[list[Row], Path | None]:
    """``spec``'s split of the folder and its manifest: read if this exact folder was split with
    these settings before, else written; a changed folder gets a new one, with a warning. Without
    ``cache_dir`` the split is made in memory only (the data root may be read-only). ``groups``:
    near duplicates kept in one split and fold, listed in GROUPS beside the manifest."""
    if cache_dir is None:
        return _new_rows(clean, spec, groups), None
    # The trailing True once said "decode-checked": kept, so the digests of splits made before stay valid.
    settings = _digest([str(root.resolve()), list(spec.sizes), spec.seed, spec.folds, True])
    listing = sorted(f for names in files.values() for f in names)
    # A folder without near duplicates keeps the digest, and the manifest, it had before groups were
    # kept together; one with them gets a new split instead of a cached one that may cut them apart.
    ungrouped = Path(cache_dir) / "splits" / f"{settings}-{_digest(listing)}"
    grouped = Path(cache_dir) / "splits" / f"{settings}-{_digest([listing, 'near-duplicate groups', MAX_DISTANCE])}"
    folder = grouped if groups else ungrouped
    path = folder / MANIFEST
    if path.is_file():
        if not (folder / GROUPS).is_file():  # written before GROUPS existed: it had no groups
            write_groups(folder, groups)
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
    write_groups(folder, groups)
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
) -> Listing:
    """The samples of ``splits`` for a root without train/validation/test folders: from
    ``spec.manifest``, else ``ROOT/manifest.csv``, else the automatic split (see the module
    docstring). ``scan`` decodes files (``{path: Check}``, see ``image_io.scan_files``)."""
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
        in_folders = {f"{name}/{f}" for name in root_dirs(root) for f in folder_files(root / name)[0]}
        unused = {f for f in in_folders if not not_an_image(f.rsplit("/", 1)[1])} - {r.file for r in rows}
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
        rows, manifest = _split_rows(root, files, clean, spec, cache_dir, groups)
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
