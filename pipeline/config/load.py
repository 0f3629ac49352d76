"""Loading the run configuration: presets, ``key=value`` overrides, and the rules across keys.

Composition order: the schema (``pipeline/config/schema.py``, the one source of defaults) ->
``configs/stage/<stage>.yaml`` -> ``configs/backbone/<backbone>.yaml`` ->
``configs/backbone/<backbone>.<stage>.yaml`` (each if present) -> command line. An unknown key or
a wrong type fails while merging (an OmegaConf structured config); each key's own choices and
range are checked from its declaration (``schema.check_values``); :func:`validate` adds the rules
that span keys, those of the free-form ``trainer.*``, and those that the implementing module owns
(a backbone name, shift names, split sizes), all before any work starts.

This module imports torch and Lightning for those checks; ``--help`` (``pipeline/config/usage.py``) does not
import it.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from omegaconf import DictConfig, OmegaConf

from core.errors import ConfigError
from datamodules.stratified_split import parse_split_sizes
from lightning_modules.backbone_base import BackboneError, BackboneSpec
from lightning_modules.backbones import backbone_spec
from lightning_modules.choices import MONITORS
from lightning_modules.schedule import Plan, PlanError, build_plan, milestones_from, parse_blocks
from pipeline.config.compose import CONFIG_DIR, compose, flatten_keys, parse_overrides
from pipeline.config.schema import STAGES, TRAINING_STAGES, RunConfig, check_values, schema_rows
from pipeline.config.usage import help_text
from pipeline.mlflow_logging import check_available as check_mlflow
from pipeline.registry import stage_spec
from pipeline.robustness.shift_report import validate_shift_config

# The names other modules import from here (the schema's live in pipeline/config/schema.py).
__all__ = [
    "CONFIG_DIR",
    "MONITORS",
    "STAGES",
    "TRAINING_STAGES",
    "RunConfig",
    "cache_dir",
    "flatten_keys",
    "help_text",
    "load_config",
    "parse_overrides",
    "plan_from_config",
    "schema_rows",
    "to_yaml",
    "validate",
    "wise_alphas",
]

# trainer.* is passed to lightning.Trainer as is, so its keys are the signature's. Importing Lightning
# here costs nothing extra: the checks below (shift report, MLflow) import it anyway.
TRAINER_KEYS = frozenset(inspect.signature(Trainer.__init__).parameters) - {"self", "callbacks", "logger"}
WISE_DEFAULT = (0.0, 0.25, 0.5, 0.75, 1.0)
SEED_IMAGE_SIZE = 150  # the seed's 150x150 inputs: data.image_size for backbones without a size of their own


def cache_dir(cfg: DictConfig) -> str:
    """``data.cache_dir``, or ``<out_dir>/cache``: feature, decoded-image, scan and split caches."""
    return cfg.data.cache_dir or str(Path(cfg.out_dir) / "cache")


def load_config(argv: list[str], config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Compose the run configuration from the presets and ``key=value`` overrides."""
    cfg, layers = compose(argv, config_dir)
    cli = layers[-1][1]
    keys = ("warmup_epochs", "unfreeze_blocks", "blocks")
    shorthand = [k for k in keys if OmegaConf.select(cli, f"finetune.{k}") is not None]
    if {"unfreeze_blocks", "blocks"} <= set(shorthand):
        raise ConfigError(
            "give either finetune.blocks or finetune.unfreeze_blocks=K (the same as finetune.blocks=top:K)"
        )
    if shorthand and OmegaConf.select(cli, "finetune.milestones") is not None:
        raise ConfigError(
            f"give either finetune.milestones or finetune.{'/'.join(shorthand)}, not both (milestones replace them)"
        )
    cfg.finetune.wise = wise_alphas(cfg.finetune.wise)
    if shorthand:  # the command line's one-step schedule replaces a preset's milestones
        cfg.finetune.milestones = None
    validate(cfg)
    return cfg


def wise_alphas(value: Any) -> list[float] | None:
    """``finetune.wise``: null/false = off, true = ``WISE_DEFAULT``, or a list of mixing weights in 0..1."""
    if value is None or value is False:
        return None
    if value is True:
        return list(WISE_DEFAULT)
    values = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else None
    if (
        not values
        or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0.0 <= a <= 1.0 for a in values)
        or len(set(values)) != len(values)
    ):
        raise ConfigError(
            f"finetune.wise must be true, null or distinct mixing weights in 0..1 (e.g. [0,0.5,1]), got {value}"
        )
    return sorted(float(a) for a in values)


def validate(cfg: DictConfig) -> None:
    """Each key's own rules (from the schema), then the rules that span keys, ``trainer.*`` and
    the checks owned by the implementing modules."""
    check_values(cfg)
    try:
        spec = backbone_spec(cfg.model.backbone)  # a timm:<name> is built once here (random weights) and cut
    except BackboneError as err:
        raise ConfigError(str(err)) from None
    _resolve_image_size(cfg, spec)
    stage = stage_spec(cfg.stage)
    # stage=test evaluates at its checkpoint's own size
    if stage.fits and cfg.data.image_size < spec.min_image_size:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} is too small for model.backbone={spec.name}: its smallest "
            f"input is {spec.min_image_size} px (its poolings and strides leave nothing below); "
            f"use data.image_size>={spec.min_image_size}"
        )
    try:
        if cfg.data.split_sizes is not None:
            parse_split_sizes(list(cfg.data.split_sizes))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    validate_shift_config(cfg.eval)
    folds, fold = cfg.data.folds, cfg.data.fold
    if (folds is None) != (fold is None):
        raise ConfigError(
            "data.folds=K and data.fold=i go together: K folds, validation on fold i (0..K-1); "
            "sweep.data.fold=[0,1,...] runs every fold"
        )
    if folds is not None and not 0 <= fold < folds:
        raise ConfigError(f"data.fold must be in 0..{folds - 1} for data.folds={folds}, got {fold}")
    _validate_trainer(cfg)
    if cfg.lr_find.min_lr >= cfg.lr_find.max_lr:
        raise ConfigError(
            f"lr_find needs lr_find.min_lr < lr_find.max_lr, got {cfg.lr_find.min_lr} and {cfg.lr_find.max_lr}"
        )
    if stage.plan:
        plan = plan_from_config(cfg)  # refuses a schedule that would not do what it says
        head_only = any(phase.top_blocks == 0 for phase in plan.phases)
        if (
            stage.takes("wise")
            and cfg.finetune.wise
            and not head_only
            and not (cfg.model.pretrained or cfg.model.weights)
        ):
            raise ConfigError(
                "finetune.wise needs a theta_0: a head-only phase (finetune.warmup_epochs >= 1) or pretrained "
                "weights (model.pretrained=true or model.weights=...)"
            )
    if cfg.log.mlflow:
        check_mlflow()
    if stage.needs_checkpoint and not cfg.ckpt_path:
        raise ConfigError(f"stage={cfg.stage} needs a checkpoint: add ckpt_path=PATH/TO/run/checkpoints/best.ckpt")


def _resolve_image_size(cfg: DictConfig, spec: BackboneSpec) -> None:
    """``data.image_size=null``: the size the backbone's weights were trained at (timm's pretrained
    config, Lite's native size), else the seed's; a size the network cannot take is refused."""
    if cfg.data.image_size is None:
        cfg.data.image_size = spec.default_image_size or SEED_IMAGE_SIZE
    size, step = cfg.data.image_size, spec.size_multiple
    if spec.fixed_size and size != spec.default_image_size:
        raise ConfigError(
            f"{cfg.model.backbone} takes {spec.default_image_size} px images only; "
            f"use data.image_size={spec.default_image_size} (or null)"
        )
    if size % step:
        raise ConfigError(
            f"data.image_size={size} is not a multiple of {cfg.model.backbone}'s patch size {step}; "
            f"use e.g. {size // step * step or step} or {(size // step + 1) * step} "
            f"(its own: {spec.default_image_size})"
        )


def _check_srun_tasks(devices: Any) -> None:
    """Under ``srun``, SLURM starts the DDP processes: one per device on each node. Lightning's own check
    of this raises with two tracebacks per process, after the data is read; here it is one line first."""
    tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE")
    if os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):  # an interactive shell: Lightning launches
        return
    want = devices if isinstance(devices, int) and devices > 0 else "N"
    if tasks > 1 and per_node is None:
        raise ConfigError(
            f"srun --ntasks={tasks} (-n) is not how Lightning counts processes: use srun --ntasks-per-node={want} "
            f"matching trainer.devices={devices}"
        )
    if per_node is not None and per_node.isdigit() and isinstance(devices, int) and int(per_node) != devices:
        raise ConfigError(f"srun --ntasks-per-node={per_node} must equal trainer.devices={devices}")


def _validate_trainer(cfg: DictConfig) -> None:
    """``trainer.*``: Lightning's own arguments, free-form in the schema, so their rules live here."""
    unknown = sorted(set(cfg.trainer) - TRAINER_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown trainer key(s) {', '.join('trainer.' + k for k in unknown)}; "
            "trainer.* must be arguments of lightning.Trainer (max_epochs, accelerator, devices, ...)"
        )
    max_epochs = cfg.trainer.get("max_epochs")
    if not isinstance(max_epochs, int) or isinstance(max_epochs, bool) or max_epochs < 1:
        raise ConfigError(f"trainer.max_epochs must be a whole number of at least 1, got {max_epochs}")
    for key in ("max_steps", "max_time", "min_steps", "min_epochs", "fast_dev_run"):
        if cfg.trainer.get(key) not in (None, -1, False):
            raise ConfigError(f"trainer.{key} is not supported: a stage's plan counts epochs (use trainer.max_epochs)")
    for key in ("limit_val_batches", "limit_test_batches"):
        if cfg.trainer.get(key, 1.0) not in (1.0, 0):
            raise ConfigError(
                f"trainer.{key}={cfg.trainer.get(key)} is not supported: the reported figures, the per-image "
                "predictions and the temperature cover the whole split (1.0) or none of it (0)"
            )
    if cfg.trainer.get("limit_train_batches") in (0, 0.0):
        raise ConfigError("trainer.limit_train_batches=0 would train nothing")
    _check_srun_tasks(cfg.trainer.get("devices"))
    if cfg.early_stop.patience > 0:
        for key, every_epoch in (("check_val_every_n_epoch", 1), ("val_check_interval", 1.0)):
            if cfg.trainer.get(key, every_epoch) != every_epoch:
                raise ConfigError(f"early_stop.patience needs one validation per epoch: remove trainer.{key}")
        if cfg.trainer.get("limit_val_batches") in (0, 0.0):
            raise ConfigError("early_stop.patience needs validation: trainer.limit_val_batches=0 turns it off")


def plan_from_config(cfg: DictConfig) -> Plan:
    """The plan of a training stage (see ``lightning_modules/schedule.py``); ConfigError if it cannot run.
    The keys' own shapes and ranges (``finetune.milestones``, ``finetune.layer_decay``) are the schema's."""
    ft = cfg.finetune
    n_blocks = backbone_spec(cfg.model.backbone).num_blocks
    try:
        blocks = None
        stage = stage_spec(cfg.stage)
        if stage.takes("blocks") and ft.blocks is not None:  # surgical: any blocks, not only the top ones
            blocks = parse_blocks(
                OmegaConf.to_object(ft.blocks) if OmegaConf.is_config(ft.blocks) else ft.blocks, n_blocks
            )
        count = len(blocks) if blocks is not None else ft.unfreeze_blocks
        milestones = milestones_from(ft.warmup_epochs, count, ft.milestones) if stage.unfreezes else None
        return build_plan(
            cfg.stage,
            int(cfg.trainer.max_epochs),
            n_blocks,
            cfg.optim.lr,
            milestones=milestones,
            blocks=blocks,
            backbone_lr_ratio=ft.backbone_lr_ratio,
            layer_decay=ft.layer_decay,
            scheduler=cfg.optim.scheduler,
            lr_warmup_epochs=cfg.optim.lr_warmup_epochs,
        )
    except PlanError as err:
        raise ConfigError(str(err)) from None


def to_yaml(cfg: DictConfig, plan: Plan | None = None) -> str:
    """The resolved config; with ``plan``, followed by the plan as the run executed it."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    if plan is not None:
        text += "# The stage's schedule as executed (lightning_modules/schedule.py); not an input key.\n"
        text += OmegaConf.to_yaml({"plan": plan.to_dict()})
    return text
