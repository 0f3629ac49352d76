"""torchvision's augmentation policies, random erasing and MixUp/CutMix (data.augment, data.random_erasing,
data.mix): each changes pixels, deterministically per seed; mixed batches still learn, and a resumed run
mixes as the uninterrupted one did."""

from __future__ import annotations

import csv

import pytest
import torch

import train
from datamodules.transforms import POLICIES, eval_transform, train_transform

from conftest import fast_args, finetune_args
from helpers import largest_weight_difference, run_dir, run_train, sigterm_then_resume

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _image() -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return (torch.rand(3, 40, 40) * 255).to(torch.uint8)


def _drawn(transform, seed: int) -> torch.Tensor:
    torch.default_generator.manual_seed(seed)  # as LabeledImages seeds each sample
    return transform(_image())


@pytest.mark.parametrize(("preset", "erasing"), [*((p, 0.0) for p in POLICIES), ("none", 1.0)])
def test_augmentation_changes_pixels_deterministically_per_seed(preset, erasing):
    transform = train_transform(preset, 32, MEAN, STD, random_erasing=erasing)
    plain = eval_transform(32, MEAN, STD)(_image())
    draws = [_drawn(transform, seed) for seed in range(4)]
    assert all(d.shape == plain.shape for d in draws)
    assert torch.equal(draws[0], _drawn(transform, 0))  # the same seed, the same pixels
    assert any(not torch.equal(d, plain) for d in draws)
    assert len({d.numpy().tobytes() for d in draws}) > 1  # other seeds, other pixels


def test_the_policies_work_on_decoded_cache_crops():
    for preset in POLICIES:
        assert _drawn(train_transform(preset, 32, MEAN, STD, cached=True), 1).shape == (3, 32, 32)


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_a_mixed_fine_tune_still_learns(toy_root, tmp_path, mix):
    metrics = run_train(fast_args(toy_root, tmp_path / "out", stage="frozen", **{"data.mix": mix}))
    with (run_dir(metrics) / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0], losses
    assert metrics["val"]["acc"] >= 0.9 and metrics["test"]["acc"] >= 0.9, metrics


def test_features_refuse_a_mix(toy_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(fast_args(toy_root, tmp_path / "out", stage="features", **{"data.mix": "cutmix"}))
    assert exc.value.code == 2
    assert "data.mix=cutmix mixes images" in capsys.readouterr().err


def test_a_resumed_mixed_run_is_the_uninterrupted_run(toy_root, tmp_path, monkeypatch, uninterrupted, capsys):
    """Interrupted inside epoch 1 (after the unfreeze): the resumed run mixes each batch as the
    uninterrupted one did (the draws are seeded from seed and global step), to the same weights."""
    settings = {"data.mix": "cutmix", "data.augment": "randaugment", "data.random_erasing": "0.5"}
    whole = uninterrupted(lambda out: finetune_args(toy_root, out, **settings))
    args = finetune_args(toy_root, tmp_path / "split", **settings)
    saved_step, resumed = sigterm_then_resume(monkeypatch, capsys, args, 8)
    assert saved_step == 9  # inside epoch 1 of 6-step epochs
    assert largest_weight_difference(whole, resumed) == 0.0
    # metrics.csv: every epoch once, the interrupted process's and the resumed one's
    with (run_dir(resumed) / "metrics.csv").open(newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2]
