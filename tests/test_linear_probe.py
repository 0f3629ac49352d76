"""stage=linear_probe: a linear head fitted by L-BFGS on the cached features, reported like any stage."""

from __future__ import annotations

import pytest
import torch

import train
from pipeline.registry import STAGE_HELP, TRAINING_STAGES
from pipeline.runner.linear_probe import MAX_ITERATIONS

from conftest import fast_args
from helpers import checkpoint_state, read_metrics, run_dir, run_train


def test_linear_probe_fits_to_convergence_and_reports_with_an_interval(toy_root, tmp_path):
    args = fast_args(toy_root, tmp_path, stage="linear_probe", **{"optim.weight_decay": "1e-3"})
    metrics = run_train(args)
    folder = run_dir(metrics)
    assert metrics["stage"] == "linear_probe" and metrics["val"]["acc"] >= 0.9
    low, high = metrics["test"]["acc_ci95"]
    assert low <= metrics["test"]["acc"] <= high
    fit = metrics["linear_probe"]
    assert 1 < fit["iterations"] < MAX_ITERATIONS and fit["converged"]  # stopped by its tolerances
    state = checkpoint_state(folder / "checkpoints" / "best-linear-probe.ckpt")
    assert read_metrics(folder)["best_ckpt"].endswith("best-linear-probe.ckpt")
    weights = [k for k in state if k.startswith("head.classifier") and k.endswith("weight")]
    assert len(weights) == 1 and state[weights[0]].dim() == 2  # one linear layer
    assert torch.isfinite(state[weights[0]]).all()


def test_the_registry_knows_linear_probe():
    assert "linear_probe" in STAGE_HELP and "linear_probe" in TRAINING_STAGES


def test_lp_ft_a_fine_tune_starts_from_the_linear_probe(toy_root, tmp_path):
    """LP-FT (Kumar et al., 2022): fine-tuning from a converged linear probe's head."""
    from conftest import finetune_args

    probe = run_train(fast_args(toy_root, tmp_path / "probe", stage="linear_probe", **{"model.dropout": "0.5"}))
    head = checkpoint_state(run_dir(probe) / "checkpoints" / "best-linear-probe.ckpt")
    with pytest.raises(SystemExit):  # the fine-tune's default head is not the probe's linear one: one line
        train.main(finetune_args(toy_root, tmp_path / "bad", **{"finetune.init_ckpt": probe["best_ckpt"]}))
    extra = {"finetune.init_ckpt": probe["best_ckpt"], "model.head_hidden": "0"}
    args = finetune_args(toy_root, tmp_path / "ft", **extra)
    from helpers import initial_state

    start = initial_state(args)
    linear = [k for k in head if k.startswith("head.classifier")]
    assert linear and all(torch.equal(start[k], head[k]) for k in linear)  # it starts from the probe's head
    assert run_train(args)["val"]["acc"] >= 0.9
