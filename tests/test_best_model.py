"""The best model: the highest validation accuracy, ties broken by the lower validation loss."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lightning_modules.best_checkpoint import better

from conftest import fast_args
from helpers import read_metrics, run_dir, run_train, scalar_tags


def test_better_breaks_accuracy_ties_by_loss():
    assert better(0.9, 0.5, 0.8, 0.1)  # higher accuracy wins whatever the loss
    assert not better(0.8, 0.01, 0.9, 0.5)
    assert better(1.0, 0.2, 1.0, 0.3)  # a tie: the lower loss wins
    assert not better(1.0, 0.3, 1.0, 0.3)  # an exact tie keeps the earlier one


def test_best_checkpoint_is_the_tied_epoch_with_the_lowest_validation_loss(toy_root, tmp_path):
    # the toy classes are told apart from the first epoch on: validation accuracy ties at 100%
    # while the loss keeps falling, so "first epoch with the best accuracy" is the least trained one
    metrics = run_train(fast_args(toy_root, tmp_path, stage="frozen", **{"trainer.max_epochs": "4"}))
    scalars = scalar_tags(run_dir(metrics))
    acc = dict(scalars["val/acc"])
    loss = dict(scalars["val/loss"])
    steps = sorted(acc)
    top = max(acc.values())
    tied = [s for s in steps if acc[s] == top]
    assert len(tied) >= 2, f"no accuracy tie to break on this toy data: {acc}"
    want_epoch = steps.index(min(tied, key=lambda s: loss[s]))
    assert want_epoch != steps.index(tied[0]), "the first tied epoch already has the lowest loss"
    epoch = int(re.search(r"best-epoch(\d+)", Path(metrics["best_ckpt"]).name).group(1))
    assert epoch == want_epoch
    # metrics.json names the epoch the checkpoint holds (the console's "chosen model" line)
    assert read_metrics(run_dir(metrics))["best_epoch"] == torch.load(metrics["best_ckpt"], weights_only=False)["epoch"]
    assert metrics["best_epoch"] == epoch
    assert read_metrics(run_dir(metrics))["val"]["loss"] <= min(loss[s] for s in tied) + 0.05  # calibrated: close
