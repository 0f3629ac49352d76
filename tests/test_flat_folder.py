"""Your own folder of images, ROOT/<class>/*: automatic stratified split, manifest, K folds."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from core.errors import ConfigError
from datamodules.data_index import scan_splits
from datamodules.image_io import check_image
from datamodules.layout import DataLayoutError, SplitSpec
from datamodules.manifest import GROUPS, read_manifest, record_split
from datamodules.near_duplicates import MAX_DISTANCE
from datamodules.stratified_split import assign_folds, carve, class_counts
from pipeline.config.load import load_config

from conftest import fast_args
from helpers import run_dir, run_train
from toy_data import COLOURS


def make_flat_tree(root: Path, per_class: dict[str, int] | None = None, size: int = 16, seed: int = 0) -> Path:
    """``root/<class>/*.png``: learnable (one dominant colour per class), no split folders."""
    per_class = per_class or {"cats": 20, "dogs": 15}
    rng = np.random.default_rng(seed)
    for label, (name, count) in enumerate(per_class.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.array(COLOURS[label % len(COLOURS)], dtype=np.float32) + rng.normal(0, 40, (size, size, 3))
            x, y = rng.integers(0, size // 2, size=2)
            pixels[y : y + size // 3, x : x + size // 3] *= 0.4
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{name}.{i}.png")
    return root


def per_class(index, split: str) -> dict[str, int]:
    counts = Counter(index.classes[label] for _, label in index.samples[split])
    return {name: counts[name] for name in index.classes}


def names(samples) -> set[str]:
    return {Path(path).name for path, _ in samples}


def test_counts_split_is_stratified_reproducible_and_kept_in_a_manifest(tmp_path):
    root = make_flat_tree(tmp_path / "flat", {"cats": 20, "dogs": 18})
    cache = tmp_path / "cache"
    spec = SplitSpec((10, 3, 2), seed=0)
    index = scan_splits(root, cache_dir=cache, split=spec)
    assert index.source == "flat" and index.classes == ["cats", "dogs"]
    for split, n in (("train", 10), ("val", 3), ("test", 2)):
        assert per_class(index, split) == {"cats": n, "dogs": n}
    all_files = [names(index.samples[s]) for s in ("train", "val", "test")]
    assert not (all_files[0] & all_files[1] or all_files[0] & all_files[2] or all_files[1] & all_files[2])
    # the manifest sits in the cache (not the data root) and holds exactly the split
    assert index.manifest.parent.parent == cache / "splits" and not (root / "manifest.csv").exists()
    rows = read_manifest(index.manifest)
    assert {(str(root / r.file), r.split) for r in rows} == {
        (path, split) for split, items in index.samples.items() for path, _ in items
    }
    with open(index.manifest, newline="") as f:
        assert next(csv.reader(f)) == ["file", "class", "split", "fold"]
    written = index.manifest.stat().st_mtime_ns
    again = scan_splits(root, cache_dir=cache, split=spec)
    assert again.samples == index.samples and again.manifest == index.manifest
    assert index.manifest.stat().st_mtime_ns == written  # read back, not split again
    other = scan_splits(root, cache_dir=cache, split=SplitSpec((10, 3, 2), seed=1))
    assert other.manifest != index.manifest and names(other.samples["test"]) != names(index.samples["test"])
    # a larger training count keeps the test and validation images (test is cut first)
    more = scan_splits(root, cache_dir=cache, split=SplitSpec((12, 3, 2), seed=0))
    assert more.samples["test"] == index.samples["test"] and more.samples["val"] == index.samples["val"]


def test_fractions_round_per_class(tmp_path):
    root = make_flat_tree(tmp_path / "flat", {"cats": 15, "dogs": 23})
    index = scan_splits(root, cache_dir=tmp_path / "cache", split=SplitSpec((0.8, 0.1, 0.1)))
    # validation and test: round(0.1 * n) with halves up (1.5 -> 2, 2.3 -> 2); train: the rest of the class
    assert per_class(index, "val") == {"cats": 2, "dogs": 2} and per_class(index, "test") == {"cats": 2, "dogs": 2}
    assert per_class(index, "train") == {"cats": 11, "dogs": 19}
    assert class_counts(15, (0.5, 0.2, 0.1)) == (8, 3, 2)  # fractions summing to < 1 leave images out
    assert class_counts(10, (0.7, 0.15, 0.15)) == (6, 2, 2)
    assert class_counts(3, (0.8, 0.1, 0.1)) == (1, 1, 1)  # every split gets one image of each class


def test_changed_folder_is_split_again_with_a_warning(tmp_path):
    root = make_flat_tree(tmp_path / "flat")
    cache, spec = tmp_path / "cache", SplitSpec((0.6, 0.2, 0.2))
    first = scan_splits(root, cache_dir=cache, split=spec)
    shutil.copy(root / "cats" / "cats.0.png", root / "cats" / "cats.new.png")
    with pytest.warns(UserWarning, match=r"changed since its last split \(1 file\(s\) added, 0 removed\)"):
        added = scan_splits(root, cache_dir=cache, split=spec)
    assert added.manifest != first.manifest
    assert "cats.new.png" in names(added.samples["train"] + added.samples["val"] + added.samples["test"])
    (root / "cats" / "cats.new.png").unlink()
    (root / "dogs" / "dogs.0.png").unlink()
    with pytest.warns(UserWarning, match=r"0 file\(s\) added, 2 removed"):
        removed = scan_splits(root, cache_dir=cache, split=spec)
    assert "dogs.0.png" not in names(removed.samples["train"] + removed.samples["val"] + removed.samples["test"])


def test_unreadable_files_are_left_out_before_the_split_and_listed(tmp_path):
    root = make_flat_tree(tmp_path / "flat")
    (root / "cats" / "broken.png").write_bytes(b"not a png")
    (root / "cats" / ".DS_Store").write_bytes(b"x")
    index = scan_splits(root, cache_dir=tmp_path / "cache", split=SplitSpec((10, 3, 2)))
    assert {Path(p).name for p, _ in index.skipped["unsplit"]} == {"broken.png", ".DS_Store"}
    assert per_class(index, "train") == {"cats": 10, "dogs": 10}  # exact: the broken file took no place
    assert "broken.png" not in {Path(r.file).name for r in read_manifest(index.manifest)}
    with pytest.raises(DataLayoutError, match=r"1 bad file\(s\), e.g. .*broken.png"):
        scan_splits(root, cache_dir=tmp_path / "cache", split=SplitSpec((10, 3, 2)), skip_bad_files=False)


def test_folds_are_disjoint_stratified_and_cover_the_non_test_images(tmp_path):
    root = make_flat_tree(tmp_path / "flat", {"cats": 20, "dogs": 16})
    cache, k = tmp_path / "cache", 3
    plain = scan_splits(root, cache_dir=cache, split=SplitSpec((0.8, 0.1, 0.1)))
    folds = [scan_splits(root, cache_dir=cache, split=SplitSpec((0.8, 0.1, 0.1), folds=k, fold=i)) for i in range(k)]
    non_test = set(plain.samples["train"] + plain.samples["val"])
    for i, index in enumerate(folds):
        assert index.samples["test"] == plain.samples["test"]  # held out once, the same for every fold
        assert set(index.samples["train"]) | set(index.samples["val"]) == non_test
        assert not set(index.samples["train"]) & set(index.samples["val"])
        assert all(index.folds[path] == i for path, _ in index.samples["val"])
        for name, n in (("cats", 18), ("dogs", 14)):  # non-test images per class: round robin, within one
            assert per_class(index, "val")[name] in (n // k, -(-n // k))
    vals = [set(index.samples["val"]) for index in folds]
    assert not (vals[0] & vals[1] or vals[0] & vals[2] or vals[1] & vals[2])
    assert vals[0] | vals[1] | vals[2] == non_test
    # the folds are in the manifest: read back, not drawn again
    rows = read_manifest(folds[0].manifest)
    assert {str(root / r.file): r.fold for r in rows if r.split != "test"} == folds[0].folds
    assert all(r.fold is None for r in rows if r.split == "test")


def test_folds_also_divide_a_three_folder_layout(toy_root):
    index = scan_splits(toy_root, split=SplitSpec(folds=4, fold=2))
    plain = scan_splits(toy_root)
    assert index.samples["test"] == plain.samples["test"]
    assert set(index.samples["train"]) | set(index.samples["val"]) == set(plain.samples["train"] + plain.samples["val"])
    assert per_class(index, "val") == {"cats": 8, "dogs": 8}  # 32 per class over 4 folds


def test_a_manifest_in_the_data_root_is_the_split(tmp_path):
    root = make_flat_tree(tmp_path / "flat", {"cats": 4, "dogs": 4})
    rows = [("cats/cats.0.png", "cats", "test"), ("dogs/dogs.0.png", "dogs", "test")]
    rows += [(f"{c}/{c}.1.png", c, "validation") for c in ("cats", "dogs")]
    rows += [(f"{c}/{c}.{i}.png", c, "train") for c in ("cats", "dogs") for i in (2, 3)]
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "class", "split", "sha256"), *[(*r, "x") for r in rows]])
    (root / "cats" / "cats.extra.png").write_bytes((root / "cats" / "cats.0.png").read_bytes())
    with pytest.warns(UserWarning, match=r"1 image file\(s\) under .* are not in .*manifest.csv"):
        index = scan_splits(root, cache_dir=tmp_path / "cache")
    assert index.source == "manifest" and index.manifest == root / "manifest.csv"
    assert names(index.samples["test"]) == {"cats.0.png", "dogs.0.png"}
    assert names(index.samples["train"]) == {f"{c}.{i}.png" for c in ("cats", "dogs") for i in (2, 3)}
    (root / "dogs" / "dogs.3.png").unlink()
    with pytest.raises(DataLayoutError, match=r"lists 1 file\(s\) missing under .*dogs/dogs.3.png"):
        scan_splits(root)


def _write_manifest(root: Path, rows: list[tuple[str, str, str]]) -> None:
    with open(root / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "class", "split"), *rows])


def _valid_rows() -> list[tuple[str, str, str]]:
    rows = [(f"{c}/{c}.0.png", c, "test") for c in ("cats", "dogs")]
    rows += [(f"{c}/{c}.1.png", c, "validation") for c in ("cats", "dogs")]
    return rows + [(f"{c}/{c}.{i}.png", c, "train") for c in ("cats", "dogs") for i in (2, 3)]


@pytest.mark.parametrize(
    ("bad_file", "message"),
    [
        ("../outside.png", r"line 10: '\.\./outside.png' points outside data.root"),
        ("cats/../../outside.png", r"line 10: 'cats/\.\./\.\./outside.png' points outside data.root"),
        (
            "ABSOLUTE",
            r"line 10: '/.*/flat/cats/cats.4.png' is an absolute path; files are listed relative to data.root",
        ),
    ],
)
def test_a_root_manifest_row_outside_the_root_is_refused_before_any_work(tmp_path, monkeypatch, bad_file, message):
    root = make_flat_tree(tmp_path / "flat", {"cats": 5, "dogs": 4})
    # The row's file exists: only its place is wrong.
    shutil.copy(root / "cats" / "cats.4.png", tmp_path / "outside.png")
    bad_file = str(root / "cats" / "cats.4.png") if bad_file == "ABSOLUTE" else bad_file
    _write_manifest(root, [*_valid_rows(), (bad_file, "cats", "train")])

    def no_decoding(*args, **kwargs):
        raise AssertionError("images were decoded before the manifest was checked")

    monkeypatch.setattr("datamodules.data_index.scan_files", no_decoding)
    with pytest.raises(DataLayoutError, match=message) as err:
        scan_splits(root, cache_dir=tmp_path / "cache")
    assert "\n" not in str(err.value) and "manifest.csv" in str(err.value)


@pytest.mark.parametrize(
    ("again", "message"),
    [
        (("cats/cats.0.png", "cats", "train"), r"line 10: 'cats/cats.0.png' is listed again \(first on line 2\)"),
        (("cats/cats.2.png", "cats", "train"), r"line 10: 'cats/cats.2.png' is listed again \(first on line 6\)"),
        (("cats/./cats.1.png", "cats", "test"), r"line 10: 'cats/./cats.1.png' is listed again \(first on line 4\)"),
    ],
    ids=["two-splits", "one-split-twice", "two-spellings"],
)
def test_a_file_listed_twice_in_a_root_manifest_is_refused(tmp_path, again, message):
    root = make_flat_tree(tmp_path / "flat", {"cats": 4, "dogs": 4})
    _write_manifest(root, [*_valid_rows(), again])
    with pytest.raises(DataLayoutError, match=message) as err:
        scan_splits(root)
    assert "\n" not in str(err.value)
    _write_manifest(root, _valid_rows())  # the same manifest without the second row is accepted
    assert scan_splits(root).counts() == {"train": 4, "val": 2, "test": 2}


def test_three_folder_layout_with_a_download_manifest_is_read_from_its_folders(toy_root, tmp_path):
    root = tmp_path / "download"
    shutil.copytree(toy_root, root)
    (root / "manifest.csv").write_text("file,class,split,sha256\n")
    (root / "_download").mkdir()
    shutil.copy(root / "train" / "cats" / "cats.0.png", root / "_download" / "x.png")  # ignored: starts with _
    index = scan_splits(root)
    assert index.source == "folders" and index.counts() == {"train": 48, "val": 16, "test": 16}


@pytest.mark.parametrize(
    ("sizes", "counts", "message"),
    [
        ((10, 3, 2), {"cats": 20, "dogs": 14}, r"class 'dogs' has 14 readable image\(s\), too few for .*\[10, 3, 2\]"),
        ((0.8, 0.1, 0.1), {"cats": 20, "dogs": 2}, r"class 'dogs' has 2 readable image\(s\).*needs at least 3"),
    ],
)
def test_a_class_too_small_is_one_clear_line(tmp_path, sizes, counts, message):
    root = make_flat_tree(tmp_path / "flat", counts)
    with pytest.raises(DataLayoutError, match=message) as err:
        scan_splits(root, split=SplitSpec(sizes))
    assert "\n" not in str(err.value)


def test_more_folds_than_images_of_a_class_is_an_error(tmp_path):
    root = make_flat_tree(tmp_path / "flat", {"cats": 20, "dogs": 5})
    with pytest.raises(DataLayoutError, match=r"class 'dogs' has 4 non-test image\(s\), fewer than data.folds=5"):
        scan_splits(root, split=SplitSpec((0.6, 0.2, 0.2), folds=5, fold=0))


def test_mixed_layouts_are_one_clear_line(tmp_path):
    root = make_flat_tree(tmp_path / "flat")
    (root / "train" / "cats").mkdir(parents=True)
    with pytest.raises(DataLayoutError, match=r"mixes split folders \(train/\) with class folders of images"):
        scan_splits(root)
    partial = make_flat_tree(tmp_path / "partial", {"train": 0}) / "train"
    shutil.copytree(root / "cats", partial / "cats")
    shutil.copytree(root / "dogs", partial / "dogs")
    with pytest.raises(DataLayoutError, match=r"missing split folder .*validation"):
        scan_splits(partial.parent)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data.folds=1", "data.fold=0"], "data.folds must be at least 2"),
        (["data.folds=3", "data.fold=3"], "data.fold must be in 0..2 for data.folds=3, got 3"),
        (["data.folds=3"], "data.folds=K and data.fold=i go together"),
        (["data.fold=1"], "data.folds=K and data.fold=i go together"),
        (["data.split_sizes=[0.8,1,0.1]"], "data.split_sizes must be three whole numbers"),
        (["data.split_sizes=[0.8,0.3,0.1]"], "sum to at most 1"),
        (["data.split_sizes=[10,5]"], "data.split_sizes must be three"),
    ],
)
def test_bad_split_settings_are_config_errors(args, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(["stage=frozen", *args])
    assert "\n" not in str(err.value)


def _manifest_counts(path: Path) -> Counter:
    return Counter(r.split for r in read_manifest(path))


def test_train_and_test_end_to_end_on_a_flat_folder(tmp_path):
    root = make_flat_tree(tmp_path / "flat", {"cats": 20, "dogs": 20}, size=32)
    extra = {"stage": "frozen", "trainer.max_epochs": "2", "data.split_sizes": "[0.7,0.15,0.15]"}
    metrics = run_train(fast_args(root, tmp_path / "runs", **extra))
    folder = run_dir(metrics)
    recorded = folder / "manifest.csv"
    assert (folder / "config.yaml").is_file() and recorded.is_file()
    counts = _manifest_counts(recorded)
    assert counts == {"train": 28, "val": 6, "test": 6}
    assert metrics["val"]["count"] == counts["val"] and metrics["test"]["count"] == counts["test"]
    assert metrics["split"]["source"] == "flat" and metrics["split"]["split_seed"] == 0
    # the run's record equals the cached split it read
    assert read_manifest(recorded) == read_manifest(Path(metrics["split"]["from"]))

    # stage=test evaluates the test split the checkpoint's run recorded
    test = run_train(fast_args(root, tmp_path / "runs", stage="test", ckpt_path=metrics["best_ckpt"]))
    assert test["split"]["from"] == str(recorded) and test["test"]["count"] == 6
    assert test["test"]["acc"] == pytest.approx(metrics["test"]["acc"])


def test_one_fold_end_to_end(tmp_path):
    root = make_flat_tree(tmp_path / "flat", {"cats": 20, "dogs": 20}, size=32)
    extra = {"stage": "frozen", "trainer.max_epochs": "1", "data.folds": "3", "data.fold": "1"}
    metrics = run_train(fast_args(root, tmp_path / "runs", **{**extra, "data.split_sizes": "[0.7,0.15,0.15]"}))
    rows = read_manifest(run_dir(metrics) / "manifest.csv")
    val = [r for r in rows if r.split == "val"]
    assert {r.fold for r in val} == {1} and len(val) == metrics["val"]["count"]
    assert sum(r.split == "test" for r in rows) == metrics["test"]["count"] == 6
    # 34 non-test images, 17 per class, dealt round robin over 3 folds: 11 or 12 validate
    assert len(val) in (11, 12) and {r.fold for r in rows if r.split == "train"} == {0, 2}
    assert metrics["split"] | {"from": None, "manifest": None} == {
        "source": "flat",
        "from": None,
        "split_sizes": [0.7, 0.15, 0.15],
        "split_seed": 0,
        "folds": 3,
        "fold": 1,
        "manifest": None,
        "near_duplicate_groups_kept_together": 0,
        "images_in_groups": 0,
    }


def test_a_flat_folder_is_never_downloaded_into(tmp_path, monkeypatch):
    import pipeline.runner.build as build

    class ModelStep(Exception):
        pass

    def no_download(cfg):
        raise AssertionError("ensure_data ran on a flat folder")

    def stop(*args, **kwargs):
        raise ModelStep

    monkeypatch.setattr(build, "ensure_data", no_download)
    monkeypatch.setattr(build, "build_model", stop)
    root = make_flat_tree(tmp_path / "flat")
    args = fast_args(root, tmp_path / "runs", stage="frozen", **{"data.source": "kaggle_cats_vs_dogs"})
    with pytest.raises(ModelStep):
        build.build_stage(load_config([*args, "data.split_sizes=[0.6,0.2,0.2]"]))
    empty = fast_args(tmp_path / "empty", tmp_path / "runs", stage="frozen", **{"data.source": "kaggle_cats_vs_dogs"})
    with pytest.raises(ConfigError, match=r"fractions split your own ROOT/<class>/ folder; a download"):
        build.build_stage(load_config([*empty, "data.split_sizes=[0.6,0.2,0.2]"]))


# --- near duplicates are cut as whole groups (issue 18) ------------------------------------------


def plant_near_duplicates(root: Path) -> list[set[str]]:
    """A pair of identical photos in cats; in dogs a photo, an identical copy and a slightly altered
    one (brighter, JPEG). Returns the groups, as file names."""
    shutil.copy(root / "cats" / "cats.3.png", root / "cats" / "cats.copy.png")
    shutil.copy(root / "dogs" / "dogs.5.png", root / "dogs" / "dogs.copy.png")
    with Image.open(root / "dogs" / "dogs.5.png") as image:
        ImageEnhance.Brightness(image.convert("RGB")).enhance(1.1).save(root / "dogs" / "dogs.altered.jpg", quality=90)
    original, altered = (check_image(str(root / "dogs" / f)).dhash for f in ("dogs.5.png", "dogs.altered.jpg"))
    assert bin(original ^ altered).count("1") <= MAX_DISTANCE  # a near duplicate, not a byte copy
    return [{"cats.3.png", "cats.copy.png"}, {"dogs.5.png", "dogs.copy.png", "dogs.altered.jpg"}]


def where(index) -> dict[str, str]:
    return {Path(path).name: split for split, items in index.samples.items() for path, _ in items}


@pytest.mark.parametrize("sizes", [(0.6, 0.2, 0.2), (10, 4, 4)], ids=["fractions", "counts"])
def test_near_duplicates_never_land_in_two_splits(tmp_path, sizes):
    root = make_flat_tree(tmp_path / "flat", {"cats": 20, "dogs": 18}, size=32)
    groups = plant_near_duplicates(root)
    for seed in range(8):
        index = scan_splits(root, threads=2, cache_dir=tmp_path / "cache", split=SplitSpec(sizes, seed=seed))
        split_of = where(index)
        for group in groups:
            assert len({split_of.get(name, "left out") for name in group}) == 1, (seed, group)
        assert index.near_duplicates == []  # the scan's own check finds no pair across the splits
        # stratified and at the requested sizes: the groups took whole places
        for name, n in (("cats", 21), ("dogs", 20)):
            want = dict(zip(("train", "val", "test"), class_counts(n, sizes)))
            assert {split: per_class(index, split)[name] for split in want} == want, (seed, name)


def test_near_duplicates_never_land_in_two_folds(tmp_path):
    root = make_flat_tree(tmp_path / "flat", {"cats": 20, "dogs": 18}, size=32)
    groups = plant_near_duplicates(root)
    for seed in range(6):
        spec = SplitSpec((0.8, 0.1, 0.1), seed=seed, folds=3, fold=0)
        index = scan_splits(root, threads=2, cache_dir=tmp_path / "cache", split=spec)
        fold_of = {Path(path).name: fold for path, fold in index.folds.items()}
        for group in groups:
            assert len({fold_of.get(name, "test") for name in group}) == 1, (seed, group)
        folds = Counter(fold_of.values())
        assert max(folds.values()) - min(folds.values()) <= 3  # dealt whole, still nearly even
        assert index.near_duplicates == []  # validation (fold 0) shares no picture with training


def test_the_split_report_counts_the_groups_kept_together(tmp_path, caplog):
    root = make_flat_tree(tmp_path / "flat", {"cats": 20, "dogs": 18}, size=32)
    groups = plant_near_duplicates(root)
    spec = SplitSpec((0.6, 0.2, 0.2), seed=1)
    with caplog.at_level(logging.INFO):
        index = scan_splits(root, threads=2, cache_dir=tmp_path / "cache", split=spec)
        again = scan_splits(root, threads=2, cache_dir=tmp_path / "cache", split=spec)
    assert again.manifest == index.manifest  # read back, and said again
    said = "2 near-duplicate group(s) of 5 images kept in one split each"
    assert sum(said in record.getMessage() for record in caplog.records) == 2
    summary = record_split(index, tmp_path / "run", spec)
    assert summary["near_duplicate_groups_kept_together"] == 2 and summary["images_in_groups"] == 5
    listed = json.loads((index.manifest.parent / GROUPS).read_text())["groups"]
    assert sorted({Path(f).name for f in group} for group in listed) == sorted(groups, key=sorted)
    plain = make_flat_tree(tmp_path / "plain", {"cats": 20, "dogs": 18}, size=32)
    summary = record_split(scan_splits(plain, threads=2, cache_dir=tmp_path / "cache", split=spec), tmp_path, spec)
    assert (summary["near_duplicate_groups_kept_together"], summary["images_in_groups"]) == (0, 0)


def test_a_split_made_before_groups_were_kept_whole_is_replaced_with_a_warning(tmp_path, monkeypatch):
    root = make_flat_tree(tmp_path / "flat", {"cats": 20, "dogs": 18}, size=32)
    plant_near_duplicates(root)
    spec, cache = SplitSpec((0.6, 0.2, 0.2), seed=2), tmp_path / "cache"
    with monkeypatch.context() as patch:  # as the earlier version did: no groups
        patch.setattr("datamodules.flat_folder.near_duplicate_groups", lambda hashes: [])
        old = scan_splits(root, threads=2, cache_dir=cache, split=spec)
    with pytest.warns(UserWarning, match=r"has 2 near-duplicate group\(s\): a new split that keeps each"):
        new = scan_splits(root, threads=2, cache_dir=cache, split=spec)
    assert new.manifest != old.manifest and new.near_duplicates == []


def _digest(split_of: dict) -> str:
    return hashlib.sha256(json.dumps(sorted(split_of.items())).encode()).hexdigest()[:16]


def test_without_near_duplicates_the_split_is_the_one_made_before(tmp_path):
    """Digests of the splits the version before groups made (the same seed, the same manifest)."""
    files = {c: [f"{c}/{c}.{i}.png" for i in range(n)] for c, n in (("cats", 23), ("dogs", 17), ("fish", 11))}
    before = {
        ((0.8, 0.1, 0.1), 0): "92b9da8235b0f82f",
        ((0.8, 0.1, 0.1), 7): "538cd23f3641f4cf",
        ((0.6, 0.2, 0.2), 7): "68b9cb8308318093",
        ((5, 3, 2), 0): "ebd8bd984998ba9d",
        ((0.5, 0.2, 0.1), 7): "9c4af0230cf0e237",
    }
    for (sizes, seed), digest in before.items():
        assert _digest(carve(files, sizes, seed)) == digest, (sizes, seed)
    pool = [(f, f.split("/")[0]) for names in files.values() for f in names]
    assert _digest(assign_folds(pool, 3, 4)) == "eeb9b52819e32ee7"
    assert _digest(assign_folds(pool, 5, 4)) == "d83dc461405b29da"
    # and through the scan, which hashes every image and finds no group here
    root = make_flat_tree(tmp_path / "flat", {"cats": 20, "dogs": 18})
    written = {SplitSpec((10, 3, 2)): "2b035df46c250405", SplitSpec((0.8, 0.1, 0.1), 3, 3, 0): "52699acdf08962f2"}
    for spec, digest in written.items():
        index = scan_splits(root, threads=2, cache_dir=tmp_path / "cache", split=spec)
        assert hashlib.sha256(index.manifest.read_bytes()).hexdigest()[:16] == digest


def test_carve_places_groups_whole_by_the_documented_rule():
    files = {"cats": [f"cats/{i}" for i in range(10)], "dogs": [f"dogs/{i}" for i in range(10)]}
    plain = carve(files, (6, 2, 2), 0)
    order = sorted(files["cats"])
    random.Random("0:cats").shuffle(order)  # the cut's order: test, test, val, val, train...
    assert [plain[f] for f in order[:5]] == ["test", "test", "val", "val", "train"]
    # the second test image and the first training image are one picture: with one test place left
    # the pair takes validation's two, and the next images move up (test, then training)
    split = carve(files, (6, 2, 2), 0, [[order[1], order[4]]])
    assert split[order[1]] == split[order[4]] == "val"
    assert [split[f] for f in (order[0], order[2], order[3])] == ["test", "test", "train"]
    assert Counter(split[f] for f in files["cats"]) == {"train": 6, "val": 2, "test": 2}
    assert {f: s for f, s in split.items() if f.startswith("dogs")} == {f: s for f, s in plain.items() if f >= "d"}
    # one picture filed under two classes stays in one split
    across = carve(files, (6, 2, 2), 0, [["cats/1", "dogs/1", "dogs/2"]])
    assert across["cats/1"] == across["dogs/1"] == across["dogs/2"]
    # groups that leave a split without an image of a class: one clear line
    with pytest.raises(DataLayoutError, match=r"class 'cats': its near-duplicate groups leave no image of it for"):
        carve({"cats": ["a", "b", "c"], "dogs": ["d", "e", "f"]}, (0.4, 0.3, 0.3), 0, [["a", "b"]])
