"""A split as a file: ``manifest.csv`` (file, class, split, fold) and the near-duplicate groups
recorded beside it (``near_duplicate_groups.json``); the exact split of a run in its folder."""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, NamedTuple

from core.atomic_io import write_json_atomic, write_text_atomic
from core.rank import is_rank_zero
from datamodules.layout import MANIFEST, SPLIT_DIRS, SPLIT_KEYS, DataLayoutError, SplitSpec

COLUMNS = ("file", "class", "split", "fold")  # the download writes file, class, split, sha256
GROUPS = "near_duplicate_groups.json"  # beside a split's manifest: the near-duplicate groups it kept whole


class Row(NamedTuple):
    file: str  # relative to the data root
    cls: str
    split: str  # train, val or test
    fold: int | None


def manifest_text(rows: Iterable[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in sorted(rows, key=lambda r: (r.cls, r.file)):
        writer.writerow((row.file, row.cls, SPLIT_DIRS[row.split], "" if row.fold is None else row.fold))
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
                split = SPLIT_KEYS.get(record["split"].strip())
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


def kept_together(groups: Sequence[Sequence[str]]) -> dict[str, int]:
    """The near-duplicate groups a split kept whole, in numbers (for metrics.json)."""
    return {"near_duplicate_groups_kept_together": len(groups), "images_in_groups": sum(map(len, groups))}


def read_groups(manifest: Path | None) -> dict[str, Any]:
    """``kept_together`` of the split in ``manifest`` (from its GROUPS file; None where it has
    none: the split was made in memory)."""
    try:
        recorded = json.loads((manifest.parent / GROUPS).read_text()) if manifest is not None else {}
        return {key: recorded[key] for key in kept_together(())}
    except (OSError, ValueError, KeyError, TypeError):
        return dict.fromkeys(kept_together(()))


def write_groups(folder: Path, groups: Sequence[Sequence[str]]) -> None:
    write_json_atomic(folder / GROUPS, kept_together(groups) | {"groups": [list(g) for g in groups]})


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
    if index.source == "folders" and not index.folds:
        return None
    path = run_dir / MANIFEST
    if is_rank_zero():
        write_text_atomic(path, run_manifest(index))
    summary: dict[str, Any] = {"source": index.source, "from": str(index.manifest) if index.manifest else None}
    if index.source == "flat":
        summary |= {"split_sizes": list(spec.sizes), "split_seed": spec.seed} | read_groups(index.manifest)
    if index.folds:
        summary |= {"folds": spec.folds, "fold": spec.fold}
    return summary | {"manifest": str(path)}
