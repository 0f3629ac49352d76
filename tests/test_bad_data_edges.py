"""Issue 25: bad inputs at the data's edges are one line or a counted, listed skip, never a traceback."""

from __future__ import annotations

import os
from pathlib import Path

from datamodules.data_index import scan_splits
from datamodules.layout import SplitSpec

from conftest import fast_args
from helpers import run_dir, run_train
from toy_data import make_image_tree


def _loop_and_dangling(folder: Path) -> None:
    """``a.jpg -> b.jpg -> a.jpg`` and a link to nothing, in a class folder."""
    os.symlink("b.jpg", folder / "a.jpg")
    os.symlink("a.jpg", folder / "b.jpg")
    os.symlink("nowhere.jpg", folder / "dangling.jpg")


def _skipped(index) -> dict[str, str]:
    return {Path(p).name: reason for items in index.skipped.values() for p, reason in items}


def test_symlink_loops_and_dangling_links_are_listed_skips_in_split_folders(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class={"train": 3, "validation": 2, "test": 2}, size=16)
    _loop_and_dangling(root / "train" / "cats")
    index = scan_splits(root)
    assert index.counts() == {"train": 6, "val": 4, "test": 4}
    skipped = _skipped(index)
    assert set(skipped) == {"a.jpg", "b.jpg", "dangling.jpg"}
    assert "symbolic link" in skipped["a.jpg"] and "dangling" in skipped["dangling.jpg"]


def test_symlink_loops_and_dangling_links_are_listed_skips_in_a_flat_folder(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class={"train": 10, "validation": 0, "test": 0}, size=16) / "train"
    _loop_and_dangling(root / "cats")
    index = scan_splits(root, split=SplitSpec((6, 2, 2)))
    assert set(_skipped(index)) == {"a.jpg", "b.jpg", "dangling.jpg"}
    assert index.counts() == {"train": 12, "val": 4, "test": 4}


def test_a_run_lists_the_symlink_loop_in_skipped_files(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class={"train": 10, "validation": 0, "test": 0}, size=16) / "train"
    _loop_and_dangling(root / "dogs")
    run = run_dir(run_train(fast_args(root, tmp_path / "out", stage="features", **{"trainer.max_epochs": "1"})))
    listed = (run / "skipped_files.tsv").read_text()
    assert all(name in listed for name in ("a.jpg", "b.jpg", "dangling.jpg"))
