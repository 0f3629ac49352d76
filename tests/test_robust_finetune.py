"""WiSE-FT and L2-SP: the interpolation's end points are the two models bit for bit, the choice
follows validation only, and L2-SP's gradient is its formula and pulls the backbone back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import ConfigError
from lightning_modules.classifier import TransferClassifier
from pipeline.config.load import load_config
from pipeline.robustness.wise import THETA0, choose, interpolate

from conftest import BACKBONE, finetune_args
from helpers import checkpoint_state, initial_state, run_dir, run_train


def _model(**extra) -> TransferClassifier:
    torch.manual_seed(0)
    return TransferClassifier(
        backbone=BACKBONE,
        class_names=["cats", "dogs"],
        image_size=32,
        head={"pool": "avg", "hidden": 0, "dropout": 0.0},
        optim_name="adam",
        weight_decay=0.01,
        decay_norm_and_bias=False,
        train_bn=False,
        tta_flip=False,
        label_smoothing=0.0,
        **extra,
    )


def test_interpolation_end_points_are_exact_and_integers_are_copied():
    a, b = _model().state_dict(), _model().state_dict()
    b = {k: (v + 1 if v.is_floating_point() else v + 3) for k, v in b.items()}
    start, end = interpolate(a, b, 0.0), interpolate(a, b, 1.0)
    assert all(torch.equal(start[k], a[k]) for k in a if a[k].is_floating_point())
    assert all(torch.equal(end[k], b[k]) for k in b)
    half = interpolate(a, b, 0.5)
    for key in a:
        if a[key].is_floating_point():
            assert torch.allclose(half[key], a[key] + 0.5), key
        else:  # BatchNorm's num_batches_tracked: the fine-tuned model's
            assert torch.equal(half[key], b[key]), key
    model = _model()
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        model.load_state_dict(a)
        want = model(images)
        model.load_state_dict(interpolate(a, b, 0.0) | {k: v for k, v in a.items() if not v.is_floating_point()})
        assert torch.equal(model(images), want)  # a=0 is theta_0's predictions, bit for bit


def test_the_choice_is_by_validation_with_ties_to_the_smaller_a():
    curve = [
        {"a": 0.0, "val_acc": 0.90, "val_loss": 0.30, "test_acc": 0.99},
        {"a": 0.5, "val_acc": 0.95, "val_loss": 0.20, "test_acc": 0.80},
        {"a": 0.75, "val_acc": 0.95, "val_loss": 0.10, "test_acc": 0.99},
        {"a": 1.0, "val_acc": 0.93, "val_loss": 0.05, "test_acc": 1.00},
    ]
    assert choose(curve)["a"] == 0.5  # not the best test accuracy, not the lowest loss


def test_a_fine_tune_with_wise_reports_the_curve_and_uses_the_chosen_model(toy_root, tmp_path):
    plain = run_train(finetune_args(toy_root, tmp_path / "plain"))
    wise = run_train(finetune_args(toy_root, tmp_path / "wise", **{"finetune.wise": "[0,1]"}))
    curve = {point["a"]: point for point in wise["wise"]["curve"]}
    assert set(curve) == {0.0, 1.0} and "head-only" in wise["wise"]["theta0"]
    # a=1 is the plain fine-tune's best checkpoint: the same validation and test accuracy
    assert curve[1.0]["val_acc"] == pytest.approx(plain["val"]["acc"])
    assert curve[1.0]["test_acc"] == pytest.approx(plain["test"]["acc"])
    # a=0 is the end of the head-only phase, saved at the hand-over
    theta0 = torch.load(run_dir(wise) / "checkpoints" / THETA0, weights_only=True)
    chosen = wise["wise"]["chosen_a"]
    assert chosen == choose(wise["wise"]["curve"])["a"]
    assert wise["best_ckpt"].endswith(f"wise-a{chosen:.2f}.ckpt")
    assert wise["val"]["acc"] == pytest.approx(curve[chosen]["val_acc"])
    stored = checkpoint_state(Path(wise["best_ckpt"]))
    expected = checkpoint_state(Path(plain["best_ckpt"])) if chosen == 1.0 else theta0
    for key, value in expected.items():
        if key != "temperature" and value.is_floating_point():
            assert torch.equal(stored[key], value), key


def test_wise_needs_a_theta0(toy_root, tmp_path):
    # no head-only phase and no pretrained weights (the suite's stand-in weights file left out)
    settings = {"finetune.warmup_epochs": "0", "finetune.wise": "true", "model.weights": "null"}
    args = finetune_args(toy_root, tmp_path, **settings)
    with pytest.raises(ConfigError, match="needs a theta_0"):
        load_config(args)


def test_l2sp_gradient_is_the_formula_and_only_on_trained_blocks():
    model = _model(l2sp=0.5)
    model.set_l2sp_reference()
    model.set_trainable_top(1)
    with torch.no_grad():
        for param in model.backbone.parameters():
            param.add_(0.1 * torch.randn_like(param))
    reference = {n: getattr(model.l2sp_reference, n.replace(".", "__")) for n, _ in model.backbone.named_parameters()}
    penalty = model.l2sp_penalty()
    penalty.backward()
    trained = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trained and len(trained) < len(list(model.backbone.parameters()))
    want = 0.25 * sum(float(((p.detach() - reference[n]) ** 2).sum()) for n, p in trained)
    assert float(penalty.detach()) == pytest.approx(want, rel=1e-5)
    for name, param in trained:
        assert torch.allclose(param.grad, 0.5 * (param.detach() - reference[name]), atol=1e-6), name
    assert all(p.grad is None for p in model.backbone.parameters() if not p.requires_grad)
    # its backbone groups decay towards nothing (the penalty replaces it); the head keeps its decay
    from lightning_modules.schedule import param_groups

    plan = load_config(["stage=finetune", "finetune.warmup_epochs=0", "finetune.unfreeze_blocks=1"])
    from pipeline.config.load import plan_from_config

    groups = param_groups(model.head, model.backbone.blocks, plan_from_config(plan), 0.01, backbone_decay=False)
    assert {g["name"]: g["weight_decay"] for g in groups if g["weight_decay"] > 0}.keys() == {"head"}


def test_l2sp_pulls_the_unfrozen_block_towards_its_start(toy_root, tmp_path):
    def drift(l2sp: str) -> float:
        args = finetune_args(toy_root, tmp_path / l2sp, **{"finetune.l2sp": l2sp, "optim.lr": "3e-2"})
        start = initial_state(args)
        end = checkpoint_state(run_dir(run_train(args)) / "checkpoints" / "last.ckpt")
        top = [k for k in start if k.startswith("backbone.blocks.") and start[k].is_floating_point()]
        top = [k for k in top if int(k.split(".")[2]) == max(int(t.split(".")[2]) for t in top)]
        return sum(float((end[k] - start[k]).pow(2).sum()) for k in top) ** 0.5

    free, pulled = drift("0"), drift("100")
    assert pulled < 0.5 * free, (free, pulled)
