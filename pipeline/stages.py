"""Run one stage end to end: data, model, the fits of each freeze phase, evaluation, metrics.json."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import seed_everything
from omegaconf import DictConfig, OmegaConf

from datamodules.feature_cache import FeatureDataModule
from datamodules.image_folder import ImageFolderDataModule, scan_splits
from lightning_modules.backbones import build_backbone
from lightning_modules.classifier import TransferClassifier
from lightning_modules.freeze_schedule import FreezeSchedule, TrainableSchedule, count_trainable
from pipeline.config import ConfigError, to_yaml
from pipeline.run_dir import resolve_run, write_json_atomic, write_text_atomic
from pipeline.trainer_factory import make_trainer

# Intentional here: frozen blocks are in eval mode, and later phases reuse the checkpoint folder.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
# Test-only switch: run all phases in one fit, as Lightning's BaseFinetuning would (unsafe under DDP).
UNSAFE_SINGLE_FIT_ENV = "TRANSFER_UNSAFE_SINGLE_FIT"
METRIC_KEYS = ("acc", "loss", "f1", "auroc", "count")


def _check_ckpt_backbone(path: str, backbone: str) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    found = ckpt.get("backbone") or ckpt.get("hyper_parameters", {}).get("backbone")
    if found != backbone:
        raise ConfigError(f"checkpoint {path} was trained with backbone {found!r}, not model.backbone={backbone!r}")
    return ckpt


def build_model(cfg: DictConfig, class_names: list[str]) -> TransferClassifier:
    model = TransferClassifier(
        backbone=cfg.model.backbone,
        class_names=class_names,
        image_size=cfg.data.image_size,
        pool=cfg.model.pool,
        head_hidden=cfg.model.head_hidden,
        dropout=cfg.model.dropout,
        optim_name=cfg.optim.name,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        scheduler=cfg.optim.scheduler,
        backbone_lr_ratio=cfg.finetune.backbone_lr_ratio,
        train_bn=cfg.finetune.train_bn,
    )
    if cfg.model.weights or cfg.model.pretrained:
        pretrained = build_backbone(cfg.model.backbone, cfg.model.pretrained, cfg.model.weights)
        model.backbone.load_state_dict(pretrained.state_dict())
    if cfg.stage == "finetune" and cfg.finetune.init_ckpt:
        ckpt = _check_ckpt_backbone(cfg.finetune.init_ckpt, cfg.model.backbone)
        model.load_state_dict(ckpt["state_dict"])
    return model


def _resumed_epoch(ckpt_path: str | None) -> int:
    """The epoch a fit resumed from ``ckpt_path`` starts at (epochs whose training finished)."""
    if ckpt_path is None:
        return 0
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])


def _summarise(results: list[dict[str, float]], prefix: str) -> dict[str, float] | None:
    if not results:
        return None
    row = results[0]
    out = {k: float(row[f"{prefix}/{k}"]) for k in METRIC_KEYS if f"{prefix}/{k}" in row}
    if "count" in out:
        out["count"] = int(round(out["count"]))
    return out


def _finish(cfg, run_dir, trainer, model, started, val, test, extra=None) -> dict[str, Any]:
    metrics = {
        "stage": cfg.stage,
        "backbone": cfg.model.backbone,
        "epochs": int(trainer.current_epoch),
        "wall_time_s": round(time.time() - started, 2),
        "val": val,
        "test": test,
        "trainable_params": count_trainable(model),
        "run_dir": str(run_dir),
        **(extra or {}),
    }
    if trainer.is_global_zero:
        write_json_atomic(run_dir / "metrics.json", metrics)
        hp_metrics = {
            f"hparams/{split}_{k}": v
            for split, d in (("val", val), ("test", test))
            if d
            for k, v in d.items()
            if k != "count"
        }
        flat = {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in _flatten(OmegaConf.to_container(cfg, resolve=True)).items()
        }
        for logger in trainer.loggers:
            logger.log_hyperparams(flat, hp_metrics)
            logger.finalize("success")
    return metrics


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_stage(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.stage``; returns (and writes to the run folder) the metrics."""
    started = time.time()
    seed_everything(cfg.seed, workers=True)
    splits = ("test",) if cfg.stage == "test" else ("train", "val", "test")
    index = scan_splits(cfg.data.root, splits)  # layout errors surface before any model is built
    run_dir, resume = resolve_run(cfg)
    if resume:
        _check_ckpt_backbone(resume, cfg.model.backbone)
    if cfg.stage == "test":
        return _run_test(cfg, run_dir, index, started)

    model = build_model(cfg, index.classes)
    images = ImageFolderDataModule(
        cfg.data.root,
        image_size=cfg.data.image_size,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        augment=cfg.data.augment,
        mean=model.backbone.mean,
        std=model.backbone.std,
        pin_memory=torch.cuda.is_available(),
        index=index,
        seed=cfg.seed,
    )
    datamodule = images
    extra: dict[str, Any] = {}
    if cfg.stage == "features":
        model.on_features = True
        cache_dir = cfg.data.cache_dir or str(Path(cfg.out_dir) / "feature_cache")
        device = "cuda" if torch.cuda.is_available() and cfg.trainer.get("accelerator", "auto") != "cpu" else "cpu"
        datamodule = FeatureDataModule(images, model, cache_dir, cfg.model.pool, device)

    _write_config(cfg, run_dir)
    schedule = FreezeSchedule(cfg.stage, cfg.finetune.warmup_epochs, cfg.finetune.unfreeze_blocks)
    max_epochs = int(cfg.trainer.get("max_epochs", 1))
    start = _resumed_epoch(resume)
    phases = schedule.phases(start, max_epochs) or [(start, max(start, max_epochs))]
    strict = os.environ.get(UNSAFE_SINGLE_FIT_ENV) != "1"
    if not strict:  # reproduces Lightning #20340 on purpose, for the test that must catch it
        phases = [(phases[0][0], phases[-1][1])]
    ckpt = resume
    for begin, end in phases:
        # One fit per phase: DDP wraps the model with exactly this phase's trainable set.
        model.set_trainable_top(schedule.trainable_blocks(begin))
        callbacks = [TrainableSchedule(schedule, begin, strict=strict)]
        trainer = make_trainer(cfg, run_dir, callbacks, model=model, max_epochs=end)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt)
        if trainer.interrupted:
            break
        ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    if cfg.stage == "features":
        extra["feature_cache"] = {"path": str(datamodule.path), "built": datamodule.computed}

    best = trainer.checkpoint_callback.best_model_path or None
    val = _summarise(trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False), "val")
    test = _summarise(trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=True), "test")
    extra["best_ckpt"] = best
    return _finish(cfg, run_dir, trainer, model, started, val, test, extra)


def _write_config(cfg: DictConfig, run_dir: Path) -> None:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))


def _run_test(cfg: DictConfig, run_dir: Path, index, started: float) -> dict[str, Any]:
    ckpt = _check_ckpt_backbone(cfg.ckpt_path, cfg.model.backbone)
    if ckpt.get("class_names") and ckpt["class_names"] != index.classes:
        raise ConfigError(f"checkpoint classes {ckpt['class_names']} differ from the test folder's {index.classes}")
    model = TransferClassifier.load_from_checkpoint(cfg.ckpt_path, map_location="cpu")
    images = ImageFolderDataModule(
        cfg.data.root,
        image_size=model.hparams.image_size,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        augment="none",
        mean=model.backbone.mean,
        std=model.backbone.std,
        pin_memory=torch.cuda.is_available(),
        index=index,
    )
    _write_config(cfg, run_dir)
    trainer = make_trainer(cfg, run_dir, [])
    test = _summarise(trainer.test(model, datamodule=images, verbose=True), "test")
    return _finish(cfg, run_dir, trainer, model, started, None, test, {"ckpt_path": cfg.ckpt_path})
