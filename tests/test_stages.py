"""Every stage end to end through train.py on tiny learnable images."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import datamodules.feature_cache as feature_cache

from conftest import BACKBONE, fast_args
from helpers import image_counts, read_metrics, run_dir, run_train, scalar_tags, tensor_tags
from toy_data import make_image_tree

METRIC_KEYS = {"acc", "loss", "f1", "auroc", "count"}


def _check_metrics(metrics: dict, stage: str, *, val: bool = True) -> None:
    assert metrics["stage"] == stage and metrics["backbone"] == BACKBONE
    assert metrics["wall_time_s"] > 0
    assert set(metrics["test"]) >= METRIC_KEYS and metrics["test"]["count"] == 16
    assert metrics["test"]["acc"] >= 0.75, metrics  # chance is 0.5
    if val:
        assert set(metrics["val"]) >= METRIC_KEYS and metrics["val"]["count"] == 16
        assert metrics["val"]["acc"] >= 0.75, metrics


@pytest.mark.parametrize("stage", ["frozen", "finetune"])
def test_image_stages_end_to_end(toy_root, tmp_path, stage):
    extra = {"finetune.warmup_epochs": "1", "finetune.unfreeze_blocks": "1"} if stage == "finetune" else {}
    metrics = run_train(fast_args(toy_root, tmp_path, stage=stage, **extra, **{"log.images_every_n_epochs": "1"}))
    folder = run_dir(metrics)
    assert folder.parent.name == f"{stage}_{BACKBONE}_{toy_root.name}"
    assert read_metrics(folder) == metrics
    _check_metrics(metrics, stage)
    assert metrics["epochs"] == 3
    saved = OmegaConf.load(folder / "config.yaml")
    assert saved.stage == stage and saved.plan.stage == stage and len(saved.plan.phases) == (2 if extra else 1)
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    assert Path(metrics["best_ckpt"]).is_file()

    scalars = scalar_tags(folder)
    for tag in [
        "train/loss",
        "train/loss_epoch",
        "train/acc",
        "val/acc",
        "val/loss",
        "val/f1",
        "val/auroc",
        "test/acc",
        "trainable_params",
        "lr/head",
        *(["lr/block4"] if stage == "finetune" else []),
    ]:
        assert tag in scalars, f"missing TensorBoard tag {tag}; have {sorted(scalars)}"
    assert len(scalars["val/acc"]) >= 3  # one point per epoch (plus the final evaluation)
    assert len(scalars["train/loss"]) >= 3 * 6 - 1  # per step: 6 steps per epoch
    # one confusion matrix per epoch, across both fits of finetune (nothing purged between phases)
    assert image_counts(folder)["val/confusion_matrix"] == 3
    tags = tensor_tags(folder)
    assert any("freeze_schedule" in t for t in tags), tags
    assert "plugin:hparams" in tags, tags


def test_features_stage_caches_and_reuses(toy_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    args = fast_args(toy_root, tmp_path, stage="features", **{"data.cache_dir": str(cache), "trainer.max_epochs": "8"})
    first = run_train(args)
    _check_metrics(first, "features")
    assert first["feature_cache"]["built"] is True
    assert len(list(cache.glob("*.pt"))) == 1

    def fail(*a, **k):
        raise AssertionError("features were recomputed although the cache is valid")

    monkeypatch.setattr(feature_cache, "extract_features", fail)
    second = run_train(args)
    assert second["feature_cache"] == {"path": first["feature_cache"]["path"], "built": False}
    assert second["test"]["acc"] == pytest.approx(first["test"]["acc"])
    monkeypatch.undo()

    resized = run_train([*args, "data.image_size=40"])
    assert resized["feature_cache"]["built"] is True
    assert resized["feature_cache"]["path"] != first["feature_cache"]["path"]


def test_feature_cache_is_rebuilt_when_the_files_change(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class={"train": 6, "validation": 3, "test": 3}, size=24)
    args = fast_args(root, tmp_path, stage="features", **{"trainer.max_epochs": "1"})
    first = run_train(args)
    (root / "train" / "cats" / "cats.0.png").unlink()
    second = run_train(args)
    assert second["feature_cache"]["built"] is True
    assert second["feature_cache"]["path"] != first["feature_cache"]["path"]


def test_test_stage_evaluates_a_checkpoint(toy_root, tmp_path):
    trained = run_train(fast_args(toy_root, tmp_path, stage="frozen"))
    metrics = run_train(fast_args(toy_root, tmp_path, stage="test", ckpt_path=trained["best_ckpt"]))
    _check_metrics(metrics, "test", val=False)
    assert metrics["test"]["acc"] == pytest.approx(trained["test"]["acc"])
    assert run_dir(metrics).parent.name == f"test_{BACKBONE}_{toy_root.name}"


def test_multiclass_uses_cross_entropy_and_learns(tmp_path):
    root = make_image_tree(tmp_path / "d", classes=("a", "b", "c"), size=32)
    metrics = run_train(fast_args(root, tmp_path, stage="frozen", **{"trainer.max_epochs": "4"}))
    assert metrics["test"]["count"] == 24
    assert metrics["test"]["acc"] >= 0.6  # chance is 1/3
