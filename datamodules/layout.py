"""What a data root looks like: its layout, the names of its splits, what a listing of it yields.

The base of the data index (``datamodules.data_index`` scans, ``datamodules.flat_folder`` splits a
folder of class folders): nothing here reads an image.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import UserError
from datamodules.image_io import IMAGE_EXTENSIONS, unreadable_reason

# The one mapping of split names: our key (train/val/test) -> its folder, and its name in a manifest.
SPLIT_DIRS = {"train": "train", "val": "validation", "test": "test"}
# A manifest's split column -> our key: the folder names, and our keys themselves.
SPLIT_KEYS = {folder: split for split, folder in SPLIT_DIRS.items()} | {split: split for split in SPLIT_DIRS}
MANIFEST = "manifest.csv"  # a split as a list of files (the download's, a flat folder's, a run's)
LAYOUT = (
    "expected layout: ROOT/{train,validation,test}/<class_name>/<image files>, "
    "or ROOT/<class_name>/<image files> (split automatically by data.split_sizes)"
)
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


class DataLayoutError(UserError, ValueError):
    """The data folder does not have the expected layout; the message is one line."""


class ChangedSinceScan(DataLayoutError):
    """An image the scan read is gone or unreadable where it must be used (evaluation, cached
    features or decoded images: each image has its place there). One line, also when a loader
    worker raised it: torch re-raises it with the worker's traceback as the message."""

    def __init__(self, message: str):
        if message.startswith("Caught ") and "\n" in message:  # torch's ExceptionWrapper.reraise
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def stat_scanned(path: str) -> os.stat_result:
    """``os.stat`` of a scanned image (for a cache key); ChangedSinceScan if it is gone."""
    try:
        return os.stat(path)
    except OSError as err:
        raise changed_since_scan(path, unreadable_reason(err)) from None


def changed_since_scan(path: str, reason: str) -> ChangedSinceScan:
    return ChangedSinceScan(
        f"{path} became unreadable after the data scan ({reason}); evaluation and cached images need every "
        "scanned image: restore it, or run again (the scan then skips and lists it)"
    )


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
            return str(root / SPLIT_DIRS[split])
        return f"the {split} split of {self.manifest or root}"


def not_an_image(name: str) -> str | None:
    """Why a file name is not taken as an image (None: it is one)."""
    if name.startswith("."):
        return "hidden file"
    if not name.lower().endswith(IMAGE_EXTENSIONS):
        return "not an image file name (extension)"
    return None


def entry_problem(entry: os.DirEntry) -> str | None:
    """Why a directory entry is not a regular file that can be read (None: it is one). A symbolic
    link is followed: a loop (``a.jpg -> b.jpg -> a.jpg``) or a link to nothing is a reason to skip
    and list it, never an OSError out of the scan."""
    try:
        if entry.is_file():
            return None
        os.stat(entry.path)  # not a file: find out why
    except OSError as err:
        if err.errno == errno.ENOENT and entry.is_symlink():
            return "dangling symbolic link (its target does not exist)"
        if err.errno == errno.ELOOP:
            return "symbolic link loop (too many levels of symbolic links)"
        return f"cannot be read ({err.strerror or type(err).__name__})"
    return "not a regular file"


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symbolic link loop: not a folder to descend into
        return False


def folder_files(folder: Path) -> tuple[list[str], dict[str, str]]:
    """The sorted names of the regular files in ``folder`` and ``{name: reason}`` of the other
    entries that are not folders (symbolic link loops, dangling links, sockets): skips to list.
    Subfolders are not files and not listed."""
    files, problems = [], {}
    for entry in os.scandir(folder):
        if _is_dir(entry):
            continue
        if (reason := entry_problem(entry)) is None:
            files.append(entry.name)
        else:
            problems[entry.name] = reason
    return sorted(files), problems


def class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if _is_dir(e) and not e.name.startswith("."))


def root_dirs(root: Path) -> list[str]:
    """Folders directly under the data root, except split folders and those starting with ``.``
    or ``_`` (the download keeps its archive in ``_download/``)."""
    ignored = set(SPLIT_DIRS.values())
    return sorted(e.name for e in os.scandir(root) if _is_dir(e) and e.name[0] not in "._" and e.name not in ignored)


def _has_images(folder: Path) -> bool:
    return any(not not_an_image(name) for name in folder_files(folder)[0])


def data_layout(root: str | Path, splits: Sequence[str] = ("train", "val", "test")) -> str:
    """``folders`` (ROOT/{train,validation,test}/<class>/), ``flat`` (ROOT/<class>/ or a
    ROOT/manifest.csv: split automatically) or ``none`` (nothing there yet: a download may make
    it). A mix of the two, or split folders without all of ``splits``, is a DataLayoutError."""
    root = Path(root)
    if not root.is_dir():
        return "none"
    present = [split for split, folder in SPLIT_DIRS.items() if (root / folder).is_dir()]
    class_folders = [name for name in root_dirs(root) if _has_images(root / name)]
    if present and class_folders:
        raise DataLayoutError(
            f"data.root={root} mixes split folders ({', '.join(SPLIT_DIRS[s] + '/' for s in present)}) with class "
            f"folders of images ({', '.join(class_folders[:3])}); {LAYOUT} (folders starting with _ are ignored)"
        )
    if present:
        missing = [SPLIT_DIRS[split] for split in splits if split not in present]
        if missing:
            raise DataLayoutError(f"missing split folder {root / missing[0]}; {LAYOUT}")
        return "folders"
    return "flat" if class_folders or (root / MANIFEST).is_file() else "none"
