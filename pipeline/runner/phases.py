"""Running a stage's plan: one ``fit`` per phase (so DDP wraps exactly that phase's trainable
set), the state handed from one phase to the next through ``checkpoints/last.ckpt``, which the
runner writes itself at the end of every phase (whatever ``trainer.*`` says about checkpointing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from core.errors import ConfigError, RunInterrupted
from lightning_modules.early_stopping import PhaseEarlyStopping
from lightning_modules.ema import PlanEMA
from lightning_modules.epoch_log import EpochLog
from lightning_modules.freeze_schedule import ApplyPlan
from lightning_modules.run_safety import EpochTimer, SaveOnInterrupt
from lightning_modules.schedule import Plan
from lightning_modules.time_estimate import TimeEstimate
from pipeline.config.load import MONITORS, plan_from_config
from pipeline.registry import takes
from pipeline.robustness.wise import save_theta0
from pipeline.runner.build import Build
from pipeline.runner.run_dir import RunFolder
from pipeline.runner.trainer_factory import intended_warnings, make_trainer, on_gpu


@dataclass
class PhasesDone:
    trainer: Trainer
    plan: Plan  # as executed (early stops included)
    timer: EpochTimer
    phases: list[dict[str, Any]]


def plan_for_run(cfg: DictConfig, resume_ckpt: dict | None) -> Plan:
    """The config's plan; a resumed run replays the early stops its checkpoint recorded, and must
    keep the optimizer it was trained with (its state would not fit another one)."""
    plan = plan_from_config(cfg)
    if resume_ckpt is None:
        return plan
    saved_plan = Plan.from_dict(resume_ckpt["plan"])
    hparams = resume_ckpt.get("hyper_parameters", {})
    now = {
        "optimizer groups": [name for name, _ in plan.groups],
        "optim.name": cfg.optim.name,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.decay_norm_and_bias": cfg.optim.decay_norm_and_bias,
        "finetune.l2sp": cfg.finetune.l2sp if takes(cfg, "l2sp") else 0.0,
    }
    before = {
        "optimizer groups": [name for name, _ in saved_plan.groups],
        "optim.name": hparams.get("optim_name"),
        "optim.weight_decay": hparams.get("weight_decay"),
        "optim.decay_norm_and_bias": hparams.get("decay_norm_and_bias"),
        "finetune.l2sp": hparams.get("l2sp"),
    }
    for key, value in now.items():
        if before[key] != value:
            raise ConfigError(
                f"cannot resume: the checkpoint was trained with {key}={before[key]}, this config has {value} "
                "(resume with the same optimizer and unfrozen blocks)"
            )
    plan = plan.replay(saved_plan.early_stops)
    if plan != saved_plan:
        rank_zero_warn(
            "the plan differs from the one the resumed checkpoint was trained with; continuing with the new one:\n"
            f"before: {saved_plan.describe()}\nnow: {plan.describe()}"
        )
    return plan


def run_phases(cfg: DictConfig, build: Build, plan: Plan) -> PhasesDone:
    """One fit per phase, from the resumed epoch on; the runner writes the hand-over checkpoint."""
    model, run = build.model, build.run
    start, step = _resume_point(build.resume_ckpt)
    build.resume_ckpt = None  # free the resumed state dict
    ckpt, timer, best_epochs = build.resume, EpochTimer(), {}
    fit_model = torch.compile(model) if cfg.speed.compile else model
    # A finished run that is resumed still needs one (empty) fit to restore its trainer state.
    index = plan.phase_index(start) if start < plan.epochs else len(plan.phases) - 1
    trainer, first_fit = None, True
    epoch_log = EpochLog(plan, timer, run)
    estimate = TimeEstimate(
        cfg.model.backbone, cfg.data.image_size, plan.epochs, on_cpu=not on_gpu(cfg), done=ckpt is not None
    )
    while index < len(plan.phases):
        phase = plan.phases[index]
        model.set_plan(plan)
        model.set_trainable_blocks(phase.trained(plan.n_blocks))
        stopper = _early_stopping(cfg, index, run)
        epoch_log.plan = plan
        callbacks = [ApplyPlan(plan, index), timer, epoch_log, estimate, *([stopper] if stopper else [])]
        if cfg.optim.ema_decay > 0:
            callbacks.append(PlanEMA(cfg.optim.ema_decay, last_phase=index == len(plan.phases) - 1))
        # purge_step: TensorBoard hides what a killed run logged after the checkpoint this
        # process resumed from; later phases of this process purge nothing
        purge = step if first_fit and ckpt is not None else None
        trainer = make_trainer(cfg, run.path, callbacks, model=model, max_epochs=phase.end, purge_step=purge)
        fit(trainer, fit_model, build.datamodule, ckpt)
        first_fit = False
        if stopper is not None and stopper.stopped:
            best_epochs[index] = stopper.restore_best(model, trainer)
            plan = plan.stop_early(index, trainer.current_epoch)
            model.set_plan(plan)
            rank_zero_info(
                f"phase {index} stopped early after epoch {trainer.current_epoch - 1}; "
                f"the next phase starts from its best epoch ({best_epochs[index]})"
            )
        ckpt = str(run.checkpoints / "last.ckpt")
        trainer.save_checkpoint(ckpt)  # the hand-over: explicit, whatever trainer.* says
        if takes(cfg, "wise") and cfg.finetune.wise and phase.top_blocks == 0:
            save_theta0(model, run.path)  # WiSE-FT's theta_0: the pretrained backbone with its trained head
        if stopper is not None and trainer.is_global_zero:
            stopper.best_path.unlink(missing_ok=True)  # its weights are in last.ckpt now
        index += 1
    return PhasesDone(trainer, plan, timer, _phase_records(plan, best_epochs))


def fit(trainer: Trainer, model, datamodule, ckpt: str | None) -> None:
    """``trainer.fit``; an interrupt (SIGINT/SIGTERM) that saved a checkpoint becomes RunInterrupted."""
    try:
        with intended_warnings():
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt)
    except SystemExit as exc:  # Lightning turns SIGINT and SIGTERM into SystemExit
        saver = next(c for c in trainer.callbacks if isinstance(c, SaveOnInterrupt))
        if not saver.saved:
            raise
        signal_name = saver.signal_name if isinstance(exc, SIGTERMException) else "SIGINT"
        raise RunInterrupted(
            f"{signal_name}: stopped at epoch {trainer.current_epoch}, step {trainer.global_step}; state saved "
            f"to {saver.path}; resume with ckpt_path=last",
            143 if signal_name == "SIGTERM" else 130,
        ) from None


def _resume_point(ckpt: dict | None) -> tuple[int, int]:
    """(epoch, global step) a fit resumed from ``ckpt`` starts at; the epoch counts epochs whose
    training finished, so a mid-epoch (interrupt) checkpoint resumes inside its epoch."""
    if ckpt is None:
        return 0, 0
    return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]), int(ckpt["global_step"])


def _phase_records(plan: Plan, best_epochs: dict[int, int | None]) -> list[dict[str, Any]]:
    """What ran, phase by phase, for metrics.json (early stops of earlier processes included)."""
    stops = dict(plan.early_stops)
    records = []
    for index, phase in enumerate(plan.phases):
        record = {"phase": index, "epochs": [phase.start, phase.end], "top_blocks": phase.top_blocks}
        if phase.blocks is not None:
            record["blocks"] = list(phase.blocks)
        if index in stops:
            record["stopped_early_at_epoch"] = phase.start + stops[index] - 1
            if best_epochs.get(index) is not None:
                record["best_epoch"] = best_epochs[index]
        records.append(record)
    return records


def _early_stopping(cfg: DictConfig, index: int, run: RunFolder) -> PhaseEarlyStopping | None:
    patience = cfg.early_stop.patience
    if patience <= 0:
        return None
    monitor = cfg.early_stop.monitor
    best = run.checkpoints / f"phase{index}-best.ckpt"
    return PhaseEarlyStopping(index, best, monitor=monitor, mode=MONITORS[monitor], patience=patience)
