"""Your own folder of images, ROOT/<class>/*: automatic stratified split, manifest, K folds."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.flat_folder import SplitSpec, class_counts, read_manifest
from datamodules.image_folder import DataLayoutError, scan_splits
from pipeline.config import ConfigError, load_config

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
    index = scan_splits(toy_root, check_files=False, split=SplitSpec(folds=4, fold=2))
    plain = scan_splits(toy_root, check_files=False)
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


def test_three_folder_layout_with_a_download_manifest_is_read_from_its_folders(toy_root, tmp_path):
    root = tmp_path / "download"
    shutil.copytree(toy_root, root)
    (root / "manifest.csv").write_text("file,class,split,sha256\n")
    (root / "_download").mkdir()
    shutil.copy(root / "train" / "cats" / "cats.0.png", root / "_download" / "x.png")  # ignored: starts with _
    index = scan_splits(root, check_files=False)
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
        scan_splits(root, check_files=False, split=SplitSpec(sizes))
    assert "\n" not in str(err.value)


def test_more_folds_than_images_of_a_class_is_an_error(tmp_path):
    root = make_flat_tree(tmp_path / "flat", {"cats": 20, "dogs": 5})
    with pytest.raises(DataLayoutError, match=r"class 'dogs' has 4 non-test image\(s\), fewer than data.folds=5"):
        scan_splits(root, check_files=False, split=SplitSpec((0.6, 0.2, 0.2), folds=5, fold=0))


def test_mixed_layouts_are_one_clear_line(tmp_path):
    root = make_flat_tree(tmp_path / "flat")
    (root / "train" / "cats").mkdir(parents=True)
    with pytest.raises(DataLayoutError, match=r"mixes split folders \(train/\) with class folders of images"):
        scan_splits(root, check_files=False)
    partial = make_flat_tree(tmp_path / "partial", {"train": 0}) / "train"
    shutil.copytree(root / "cats", partial / "cats")
    shutil.copytree(root / "dogs", partial / "dogs")
    with pytest.raises(DataLayoutError, match=r"missing split folder .*validation"):
        scan_splits(partial.parent, check_files=False)


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
    }


def test_a_flat_folder_is_never_downloaded_into(tmp_path, monkeypatch):
    import pipeline.stages as stages

    class ModelStep(Exception):
        pass

    def no_download(cfg):
        raise AssertionError("ensure_data ran on a flat folder")

    def stop(*args, **kwargs):
        raise ModelStep

    monkeypatch.setattr(stages, "ensure_data", no_download)
    monkeypatch.setattr(stages, "build_model", stop)
    root = make_flat_tree(tmp_path / "flat")
    args = fast_args(root, tmp_path / "runs", stage="frozen", **{"data.source": "kaggle_cats_vs_dogs"})
    with pytest.raises(ModelStep):
        stages.build_stage(load_config([*args, "data.split_sizes=[0.6,0.2,0.2]"]))
    empty = fast_args(tmp_path / "empty", tmp_path / "runs", stage="frozen", **{"data.source": "kaggle_cats_vs_dogs"})
    with pytest.raises(ConfigError, match=r"fractions split your own ROOT/<class>/ folder; a download"):
        stages.build_stage(load_config([*empty, "data.split_sizes=[0.6,0.2,0.2]"]))
