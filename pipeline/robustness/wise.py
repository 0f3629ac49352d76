"""WiSE-FT (Wortsman et al., CVPR 2022): the fine-tuned weights interpolated towards theta_0.

``theta(a) = (1 - a) * theta_0 + a * theta_ft`` over the whole state dict (BatchNorm statistics
included; integer buffers copied from the fine-tuned model), where theta_0 is the model at the end
of the head-only phase (the pretrained backbone with its trained head: LP-FT's linear probe) or,
for a plan without one, the pretrained backbone with the final head. Each ``a`` is evaluated on
validation, and the one with the best validation accuracy is chosen (ties: the smaller ``a``,
closer to the pretrained weights); test figures are reported for the whole curve, never used to
choose. The chosen model is saved as a checkpoint and is what the run then calibrates, tests and
exports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from core.atomic_io import torch_save_atomic
from lightning_modules.backbones import build_backbone
from pipeline.runner.run_dir import is_rank_zero

THETA0 = "wise-theta0.pt"
RULE = "best validation accuracy; ties: the smaller a, then the lower validation loss"


def theta0_path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / THETA0


def save_theta0(model: torch.nn.Module, run_dir: Path) -> None:
    """The end of a head-only phase, kept for the interpolation (rank zero; survives a resume)."""
    if is_rank_zero():
        torch_save_atomic({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, theta0_path(run_dir))


def interpolate(theta0: dict[str, torch.Tensor], theta_ft: dict[str, torch.Tensor], a: float) -> dict:
    """``(1 - a) * theta0 + a * theta_ft`` for floating tensors (exactly theta0 at 0 and theta_ft at
    1), integer tensors (BatchNorm's batch counters) from theta_ft."""
    if theta0.keys() != theta_ft.keys():
        raise ValueError(f"theta_0 and the fine-tuned model differ in keys: {sorted(theta0.keys() ^ theta_ft.keys())}")
    out = {}
    for key, ft in theta_ft.items():
        start = theta0[key]
        if not ft.is_floating_point() or a == 1.0:
            out[key] = ft.clone()
        elif a == 0.0:
            out[key] = start.to(ft.dtype).clone()
        else:
            out[key] = (1.0 - a) * start.to(ft.dtype) + a * ft
    return out


def choose(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """The point of the curve the rule picks (see ``RULE``); validation figures only."""
    return min(curve, key=lambda point: (-point["val_acc"], point["a"], point["val_loss"]))


def uncalibrated(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CPU copy of ``state`` at temperature 1."""
    state = {k: v.detach().cpu().clone() for k, v in state.items()}
    if "temperature" in state:  # a temperature is fitted afterwards, for the chosen weights
        state["temperature"] = torch.ones(())
    return state


def _load(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict, or a saved plain state dict (theta_0)."""
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    return uncalibrated(loaded["state_dict"] if "state_dict" in loaded else loaded)


def _theta0(cfg: DictConfig, run_dir: Path, theta_ft: dict[str, torch.Tensor]) -> tuple[dict, str]:
    saved = theta0_path(run_dir)
    if saved.is_file():
        return _load(saved), "the end of the head-only phase (pretrained backbone, trained head)"
    pretrained = build_backbone(cfg.model.backbone, cfg.model.pretrained, cfg.model.weights).state_dict()
    theta0 = dict(theta_ft)
    theta0.update({f"backbone.{k}": v for k, v in pretrained.items()})
    return theta0, "the pretrained backbone with the final head (the plan has no head-only phase)"


def run_wise(
    cfg: DictConfig, trainer: Trainer, model, datamodule, run_dir: Path, best: str | None, summarise, shift_acc
) -> tuple[str, dict[str, Any]]:
    """Evaluate every ``finetune.wise`` weight, choose one by validation, save it as a checkpoint;
    returns its path and the curve for metrics.json. ``shift_acc(model)``: the mean accuracy under
    the configured shifts (None when the shift report is off), reported per weight, never chosen by."""
    theta_ft = _load(best) if best else uncalibrated(model.state_dict())
    theta0, source = _theta0(cfg, run_dir, theta_ft)
    loggers, trainer.loggers = trainer.loggers, []  # the curve goes to metrics.json, not the training curves
    curve = []
    try:
        for a in cfg.finetune.wise:
            model.load_state_dict(interpolate(theta0, theta_ft, a))
            val = summarise(trainer.validate(model, datamodule=datamodule, verbose=False), "val") or {}
            test = summarise(trainer.test(model, datamodule=datamodule, verbose=False), "test") or {}
            curve.append(
                {
                    "a": a,
                    "val_acc": val.get("acc"),
                    "val_loss": val.get("loss"),
                    "test_acc": test.get("acc"),
                    "test_acc_ci95": test.get("acc_ci95"),
                    "shift_acc": shift_acc(model),
                }
            )
            rank_zero_info(f"WiSE-FT a={a:.2f}: val acc {val.get('acc', float('nan')):.4f} (test reported only)")
    finally:
        trainer.loggers = loggers
    chosen = choose(curve)
    # the validation figures are synchronised, so every rank chooses alike; rank zero's choice is
    # broadcast anyway, and a rank that disagreed would be a bug worth stopping for
    if trainer.strategy.broadcast(chosen["a"], src=0) != chosen["a"]:
        raise RuntimeError(f"WiSE-FT: rank {trainer.global_rank} chose a={chosen['a']}, rank zero another")
    model.load_state_dict(interpolate(theta0, theta_ft, chosen["a"]))
    path = run_dir / "checkpoints" / f"wise-a{chosen['a']:.2f}.ckpt"
    trainer.save_checkpoint(path)  # every rank calls it; Lightning writes on rank zero
    rank_zero_info(f"WiSE-FT: a={chosen['a']:.2f} chosen by validation ({RULE}); saved {path}")
    return str(path), {"theta0": source, "rule": RULE, "chosen_a": chosen["a"], "curve": curve}
