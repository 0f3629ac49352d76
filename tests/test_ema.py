"""Weight EMA: the average is what is validated, checkpointed and evaluated; resume keeps it."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from datamodules.image_io import load_rgb
from datamodules.transforms import eval_transform
from pipeline.prediction import load_model

from conftest import finetune_args
from helpers import read_metrics, run_dir, run_train, sigterm_at_step


def _args(root: Path, out: Path, **extra: str) -> list[str]:
    return finetune_args(root, out, **({"optim.ema_decay": "0.9", "trainer.max_epochs": "3"} | extra))


def test_ema_weights_are_checkpointed_and_evaluated(toy_root, tmp_path):
    metrics = run_train(_args(toy_root, tmp_path))
    best = torch.load(metrics["best_ckpt"], map_location="cpu", weights_only=True)
    average, raw = best["state_dict"], best["current_model_state"]
    changed = [
        k for k in average if k.startswith(("head.", "backbone.blocks.4")) and not torch.equal(average[k], raw[k])
    ]
    assert changed, "the average equals the raw weights"
    frozen = [k for k in average if k.startswith("backbone.blocks.0.")]
    assert all(torch.equal(average[k], raw[k]) for k in frozen)  # never trained: nothing to average

    # the run's recorded test predictions are those of the averaged weights, not of the raw ones
    with open(metrics["test_predictions"], newline="") as f:
        rows = list(csv.DictReader(f))
    model = load_model(metrics["best_ckpt"])
    size = int(model.hparams.image_size)
    transform = eval_transform(size, model.backbone.mean, model.backbone.std)
    images = torch.stack([transform(load_rgb(r["file"], size)) for r in rows])
    recorded = torch.tensor([float(r["prob_dogs"]) for r in rows])
    with torch.no_grad():
        ema_logits = model.logits(images)
        model.load_state_dict(raw | {"temperature": average["temperature"]})
        raw_logits = model.logits(images)
    assert (model.probabilities(ema_logits)[:, 1] - recorded).abs().max() < 1e-4
    # (probabilities of toy data saturate near 0 and 1: the raw weights' differ in the logits)
    assert (raw_logits - ema_logits).abs().max() > 1e-2


def test_an_interrupted_run_resumes_with_its_average(toy_root, tmp_path, monkeypatch):
    """SIGTERM in the middle of the fine-tuning phase; the resumed run ends with the same average
    and the same raw weights as the uninterrupted one."""
    import pytest

    import train

    args = {"trainer.deterministic": "true"}
    whole = run_train(_args(toy_root, tmp_path / "whole", **args))
    sigterm_at_step(monkeypatch, 9)
    with pytest.raises(SystemExit):
        train.main(_args(toy_root, tmp_path / "split", **args))
    monkeypatch.undo()
    resumed = run_train([*_args(toy_root, tmp_path / "split", **args), "ckpt_path=last"])
    a = torch.load(run_dir(whole) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(run_dir(resumed) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for key in ("state_dict", "current_model_state"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert read_metrics(run_dir(resumed))["test"] == whole["test"]
