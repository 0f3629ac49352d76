"""Issue 25: bad inputs at the data's edges are one line or a counted, listed skip, never a traceback."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from core.errors import ConfigError
from datamodules.class_balance import describe_counts
from datamodules.data_index import SplitIndex, scan_splits
from datamodules.layout import DataLayoutError, SplitSpec
from lightning_modules import figures, tensorboard_views
from lightning_modules.backbones import BACKBONES, backbone_spec, build_backbone
from pipeline.config.load import CONFIG_DIR, load_config
from pipeline.runner import build

from conftest import fast_args
from helpers import error_line, image_sizes, run_dir, run_train
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


@pytest.mark.parametrize("backbone", ["vgg16", "convnext_tiny", "efficientnet_lite0"])
def test_an_image_size_below_the_backbones_minimum_is_one_config_line(backbone):
    minimum = backbone_spec(backbone).min_image_size
    with pytest.raises(
        ConfigError, match=rf"data.image_size=7 is too small for model.backbone={backbone}: .* {minimum}"
    ):
        load_config([f"model.backbone={backbone}", "data.image_size=7"])
    load_config([f"model.backbone={backbone}", f"data.image_size={minimum}"])


# Every built-in that builds in seconds with random weights (resnet50 is resnet18's family: minimum 1).
@pytest.mark.parametrize("name", sorted(set(BACKBONES) - {"resnet50"}))
def test_each_declared_minimum_input_works_and_one_pixel_less_fails(name):
    backbone = build_backbone(name, pretrained=False).eval()
    minimum = BACKBONES[name].min_image_size
    with torch.no_grad():
        assert backbone(torch.zeros(1, 3, minimum, minimum)).shape[-1] >= 1
        if minimum > 1:
            with pytest.raises(RuntimeError):
                backbone(torch.zeros(1, 3, minimum - 1, minimum - 1))


def test_a_timm_backbones_minimum_is_measured_when_its_spec_is_made():
    pytest.importorskip("timm")
    spec = backbone_spec("timm:convnext_atto")  # a 4x4 stem and three 2x2 downsamplings, unpadded: 32 px
    assert spec.min_image_size == 32
    with pytest.raises(ConfigError, match=r"data.image_size=31 is too small .* 32 px"):
        load_config(["model.backbone=timm:convnext_atto", "data.image_size=31"])


@pytest.mark.parametrize(
    ("preset", "text", "where"),
    [
        ("stage/finetune.yaml", "model:\n  dropout: 0.5\n   head_hidden: 3\n", "line 3, column 15"),
        ("backbone/efficientnet_lite0.yaml", "model:\n  dropout: [0.5\noptim:\n  lr: 1e-3\n", "line 3, column 6"),
        ("stage/frozen.yaml", "- 1\n- 2\n", "not a mapping"),
    ],
)
def test_a_broken_preset_is_one_line_naming_the_file_and_the_place(tmp_path, preset, text, where):
    shutil.copytree(CONFIG_DIR, tmp_path / "configs")
    (tmp_path / "configs" / preset).write_text(text)
    stage = "frozen" if preset.startswith("stage/frozen") else "finetune"
    with pytest.raises(ConfigError) as err:
        load_config([f"stage={stage}", "model.backbone=efficientnet_lite0"], config_dir=tmp_path / "configs")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "configs" / preset) in message and where in message, message


@pytest.fixture(scope="module")
def trained_run(toy_root, tmp_path_factory) -> Path:
    """A one-epoch features run on the toy data (its checkpoints are cut or damaged by the tests)."""
    out = tmp_path_factory.mktemp("trained")
    return run_dir(run_train(fast_args(toy_root, out, stage="features", **{"trainer.max_epochs": "1"})))


def test_a_truncated_last_checkpoint_stops_a_resume_with_one_line(toy_root, tmp_path, capsys):
    args = fast_args(toy_root, tmp_path / "out", stage="features", **{"trainer.max_epochs": "1"})
    last = run_dir(run_train(args)) / "checkpoints" / "last.ckpt"
    size = last.stat().st_size // 2
    os.truncate(last, size)
    err = error_line(capsys, [*args, "ckpt_path=last"])
    assert f"is truncated or corrupt ({size} bytes): " in err and "weights_only" not in err, err


def test_a_truncated_checkpoint_is_reported_as_truncated_in_one_whole_line(trained_run, tmp_path, capsys, toy_root):
    cut = tmp_path / "last.ckpt"
    data = (trained_run / "checkpoints" / "last.ckpt").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    for args, what in (
        (fast_args(toy_root, tmp_path / "out", stage="test", ckpt_path=str(cut)), f"checkpoint {cut}"),
        (fast_args(toy_root, tmp_path / "out", **{"model.weights": str(cut)}), f"model.weights={cut}"),
    ):
        err = error_line(capsys, args)
        assert f"{what} is truncated or corrupt ({len(data) // 2} bytes): " in err, err
        # torch's first sentence, whole: not a weights_only safety refusal, not cut mid-sentence
        assert "weights_only" not in err and err.endswith("failed finding central directory"), err


def _flat(tmp_path: Path, counts: dict[str, int]) -> Path:
    """ROOT/<class>/ with ``counts`` images per class (a flat folder: split automatically)."""
    root = make_image_tree(tmp_path / "d", per_class={"train": max(counts.values()), "validation": 0, "test": 0})
    for name, count in counts.items():
        for extra in sorted((root / "train" / name).iterdir())[count:]:
            extra.unlink()
    return root / "train"


@pytest.mark.parametrize(
    ("sizes", "counts"),
    [
        ((10, 3, 2), {"cats": 20, "dogs": 14}),  # counts too large for dogs
        ((12, 4, 4), {"cats": 20, "dogs": 5}),
        ((0.1, 0.1, 0.1), {"cats": 4, "dogs": 4}),  # fractions that leave no training image
    ],
)
def test_the_split_size_hint_suggests_sizes_that_work(tmp_path, sizes, counts):
    root = _flat(tmp_path, counts)
    with pytest.raises(DataLayoutError) as err:
        scan_splits(root, split=SplitSpec(sizes))
    hint = re.search(r"e\.g\. data\.split_sizes=(\[[^\]]*\])", str(err.value))
    assert hint, str(err.value)
    suggested = tuple(json.loads(hint.group(1)))
    assert suggested != tuple(sizes)
    assert all(n > 0 for n in scan_splits(root, split=SplitSpec(suggested)).counts().values())


def test_a_class_too_small_for_any_split_says_so_without_a_size_hint(tmp_path):
    root = _flat(tmp_path, {"cats": 20, "dogs": 2})
    with pytest.raises(DataLayoutError, match=r"class 'dogs' has 2 readable image\(s\).* at least 3") as err:
        scan_splits(root, split=SplitSpec((0.8, 0.1, 0.1)))
    assert "data.split_sizes=[0.8,0.1,0.1]" not in str(err.value).split("too few for")[1]


def _index(train_counts: list[int]) -> SplitIndex:
    classes = [f"c{i:03d}" for i in range(len(train_counts))]
    samples = [(f"{classes[c]}/{k}.png", c) for c, n in enumerate(train_counts) for k in range(n)]
    return SplitIndex(Path("root"), classes, {"train": samples})


def test_many_balanced_classes_get_no_imbalance_warning():
    assert describe_counts(_index([3] * 200))[1] == []
    assert describe_counts(_index([2, 3] * 100))[1] == []  # 2 against a mean of 2.5: ordinary


def test_rare_classes_are_one_warning_line_naming_the_worst():
    counts = [40] * 197 + [1, 2, 3] + [5] * 5  # eight classes far below the mean (about 37 per class)
    _, warnings = describe_counts(_index(counts))
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("8 of 205 classes have under a quarter of the mean share"), warnings[0]
    assert "'c197' 1 (0.013%)" in warnings[0] and "and 3 more" in warnings[0]


def test_many_classes_keep_the_tensorboard_views_bounded(tmp_path, recwarn, monkeypatch):
    classes = tuple(f"c{i:02d}" for i in range(60))
    root = make_image_tree(tmp_path / "d", classes, per_class={"train": 2, "validation": 1, "test": 1}, size=16)
    drawn: list[int] = []
    original = figures.confusion_matrix_image

    def counting(matrix, names, *args, **kwargs):
        drawn.append(len(names))
        return original(matrix, names, *args, **kwargs)

    monkeypatch.setattr(tensorboard_views, "confusion_matrix_image", counting)
    args = fast_args(root, tmp_path / "out", stage="frozen", **{"trainer.max_epochs": "1"})
    run = run_dir(run_train([*args, "log.images_every_n_epochs=1", "log.max_images=64"]))
    assert not [w for w in recwarn if "training images" in str(w.message)]  # balanced: no imbalance warning
    sizes = image_sizes(run)
    assert drawn == [60] and sizes["val/confusion_matrix"][1] <= 110 + 30 * 48 + 10  # the 30 most confused
    assert all(max(w, h) <= 2000 for w, h in sizes.values()), sizes  # every grid capped (log.max_images)


def test_a_large_confusion_matrix_shows_the_most_confused_classes():
    matrix = torch.diag(torch.full((200,), 3))
    matrix[5, 150] = matrix[150, 5] = matrix[7, 8] = 2
    assert {5, 7, 8, 150} <= set(figures.most_confused(matrix, 30))
    assert figures.confusion_matrix_image(matrix, [f"c{i}" for i in range(200)]).shape[-1] <= 110 + 30 * 48 + 10


def _delete_after_scan(monkeypatch, split: str) -> list[str]:
    """The next run's scan is followed by the deletion of the first image of ``split`` (a file
    removed while the run starts); returns [its path]."""
    original, gone = build.scan_splits, []

    def scan_then_delete(*args, **kwargs):
        index = original(*args, **kwargs)
        gone.append(index.samples[split][0][0])
        os.unlink(gone[0])
        return index

    monkeypatch.setattr(build, "scan_splits", scan_then_delete)
    return gone


def test_a_training_image_deleted_after_the_scan_is_a_listed_skip(tmp_path, monkeypatch, recwarn):
    root = make_image_tree(tmp_path / "d", per_class={"train": 6, "validation": 2, "test": 2}, size=16)
    gone = _delete_after_scan(monkeypatch, "train")
    args = fast_args(root, tmp_path / "out", stage="frozen", **{"trainer.max_epochs": "1"})
    metrics = run_train([*args, "log.images_every_n_epochs=1"])  # the views read the first images first
    listed = [str(w.message) for w in recwarn if gone[0] in str(w.message)]
    assert listed and "became unreadable after the data scan" in listed[0], listed
    assert metrics["val"]["count"] == 4 and metrics["test"]["count"] == 4


@pytest.mark.parametrize(
    ("split", "extra"),
    [
        ("val", {"stage": "frozen"}),
        ("val", {"stage": "frozen", "data.num_workers": "1"}),  # raised in a loader worker: still one line
        ("train", {"stage": "features"}),  # cached features: each image has its place
        ("train", {"stage": "frozen", "data.decoded_cache": "true"}),
    ],
)
def test_an_image_deleted_after_the_scan_where_each_has_its_place_is_one_line(
    tmp_path, monkeypatch, capsys, split, extra
):
    root = make_image_tree(tmp_path / "d", per_class={"train": 6, "validation": 2, "test": 2}, size=16)
    gone = _delete_after_scan(monkeypatch, split)
    args = fast_args(root, tmp_path / "out", **{"trainer.max_epochs": "1", **extra})
    err = error_line(capsys, args)
    assert err.startswith(f"error: {gone[0]} became unreadable after the data scan"), err
