"""Run one stage end to end: data, model, the fits of each freeze phase, evaluation, metrics.json."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from datamodules.feature_cache import FeatureDataModule
from datamodules.image_folder import ImageFolderDataModule, default_num_workers, scan_splits
from lightning_modules.backbones import build_backbone
from lightning_modules.classifier import TransferClassifier
from lightning_modules.freeze_schedule import FreezeSchedule, TrainableSchedule, count_trainable
from lightning_modules.run_safety import EpochTimer, SaveOnInterrupt
from pipeline.config import ConfigError, to_yaml
from pipeline.run_dir import resolve_run, write_json_atomic, write_text_atomic
from pipeline.trainer_factory import apply_speed_settings, make_trainer

# Intentional here: frozen blocks are in eval mode, and later phases reuse the checkpoint folder.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
# Test-only switch: run all phases in one fit, as Lightning's BaseFinetuning would (unsafe under DDP).
UNSAFE_SINGLE_FIT_ENV = "TRANSFER_UNSAFE_SINGLE_FIT"
METRIC_KEYS = ("acc", "loss", "f1", "auroc", "count")


class RunInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped a fit after its state was saved; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def load_checkpoint(path: str) -> dict:
    """A checkpoint loaded without running pickled code (``weights_only=True``), or a clear error."""
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure: refuse the file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"checkpoint {path} cannot be loaded safely with weights_only=True ({first})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"{path} is not a checkpoint of this project (no state_dict)")
    return ckpt


def _check_ckpt_backbone(path: str, backbone: str) -> dict:
    ckpt = load_checkpoint(path)
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
        tta_flip=cfg.model.tta_flip,
        label_smoothing=cfg.optim.label_smoothing,
    )
    if cfg.model.weights or cfg.model.pretrained:
        pretrained = build_backbone(cfg.model.backbone, cfg.model.pretrained, cfg.model.weights)
        model.backbone.load_state_dict(pretrained.state_dict())
    if cfg.stage == "finetune" and cfg.finetune.init_ckpt:
        ckpt = _check_ckpt_backbone(cfg.finetune.init_ckpt, cfg.model.backbone)
        model.load_state_dict(ckpt["state_dict"])
    return model


def _resume_point(ckpt: dict | None) -> tuple[int, int]:
    """(epoch, global step) a fit resumed from ``ckpt`` starts at; the epoch counts epochs whose
    training finished, so a mid-epoch (interrupt) checkpoint resumes inside its epoch."""
    if ckpt is None:
        return 0, 0
    return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]), int(ckpt["global_step"])


def _report_skipped(index, run_dir: Path) -> None:
    """One warning per split with skipped files; the full list in the run folder (rank zero)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from lightning.pytorch.utilities import rank_zero_warn

    rows = [(split, path, reason) for split, items in index.skipped.items() for path, reason in items]
    if not rows or rank_zero_only.rank != 0:
        return
    listing = run_dir / "skipped_files.tsv"
    write_text_atomic(listing, "split\tfile\treason\n" + "".join(f"{s}\t{p}\t{r}\n" for s, p, r in rows))
    for split, items in index.skipped.items():
        if items:
            names = ", ".join(Path(p).name for p, _ in items[:5]) + (" ..." if len(items) > 5 else "")
            rank_zero_warn(f"{split}: skipped {len(items)} unreadable image file(s): {names} (all listed in {listing})")


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


def ensure_data(cfg: DictConfig) -> None:
    """Download and carve ``data.source`` into ``data.root`` if it has no train/ (rank zero only)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from datamodules.download import prepare_dataset

    if cfg.stage == "test":
        return
    prepare_dataset(
        cfg.data.root,
        cfg.data.source,
        cfg.data.url,
        cfg.data.sha256,
        list(cfg.data.split_sizes),
        cfg.seed,
        is_rank_zero=rank_zero_only.rank == 0,
    )


def run_stage(cfg: DictConfig, run_name: str | None = None) -> dict[str, Any]:
    """Run ``cfg.stage``; returns (and writes to the run folder) the metrics."""
    started = time.time()
    seed_everything(cfg.seed, workers=True)
    splits = ("test",) if cfg.stage == "test" else ("train", "val", "test")
    ensure_data(cfg)
    # layout errors surface before any model is built; unreadable files are found here too
    threads = cfg.data.num_workers or default_num_workers()
    index = scan_splits(cfg.data.root, splits, skip_bad_files=cfg.data.skip_bad_files, threads=threads)
    run_dir, resume = resolve_run(cfg, run_name)
    resume_ckpt = _check_ckpt_backbone(resume, cfg.model.backbone) if resume else None
    _report_skipped(index, run_dir)
    if cfg.stage == "test":
        return _run_test(cfg, run_dir, index, started)

    apply_speed_settings(cfg)
    model = build_model(cfg, index.classes)
    if cfg.speed.channels_last:
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    cache_dir = cfg.data.cache_dir or str(Path(cfg.out_dir) / "cache")
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
        decoded_cache_dir=cache_dir if cfg.data.decoded_cache else None,
    )
    datamodule = images
    extra: dict[str, Any] = {}
    if cfg.stage == "features":
        model.on_features = True
        device = "cuda" if torch.cuda.is_available() and cfg.trainer.get("accelerator", "auto") != "cpu" else "cpu"
        datamodule = FeatureDataModule(
            images,
            model,
            cache_dir,
            cfg.model.pool,
            device,
            flip_train=cfg.data.augment != "none",
            flip_eval=cfg.model.tta_flip,
        )

    _write_config(cfg, run_dir)
    schedule = FreezeSchedule(cfg.stage, cfg.finetune.warmup_epochs, cfg.finetune.unfreeze_blocks)
    max_epochs = int(cfg.trainer.get("max_epochs", 1))
    start, step = _resume_point(resume_ckpt)
    del resume_ckpt
    phases = schedule.phases(start, max_epochs) or [(start, max(start, max_epochs))]
    strict = os.environ.get(UNSAFE_SINGLE_FIT_ENV) != "1"
    if not strict:  # reproduces Lightning #20340 on purpose, for the test that must catch it
        phases = [(phases[0][0], phases[-1][1])]
    ckpt = resume
    timer = EpochTimer()
    fit_model = torch.compile(model) if cfg.speed.compile else model
    for begin, end in phases:
        # One fit per phase: DDP wraps the model with exactly this phase's trainable set.
        model.set_trainable_top(schedule.trainable_blocks(begin))
        callbacks = [TrainableSchedule(schedule, begin, strict=strict), timer]
        # purge_step: TensorBoard hides what a killed run logged after its last checkpoint;
        # purge only what an earlier process may have logged past its checkpoint, not this one's phases
        purge = step if ckpt is not None and ckpt == resume else None
        trainer = make_trainer(cfg, run_dir, callbacks, model=model, max_epochs=end, purge_step=purge)
        _fit(trainer, fit_model, datamodule, ckpt)
        ckpt, step = str(run_dir / "checkpoints" / "last.ckpt"), trainer.global_step
    if cfg.stage == "features":
        extra["feature_cache"] = {"path": str(datamodule.path), "built": datamodule.computed}

    best = trainer.checkpoint_callback.best_model_path or None
    val = _summarise(trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False), "val")
    test = _summarise(trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=True), "test")
    extra["best_ckpt"] = best
    extra |= _speed_report(timer)
    return _finish(cfg, run_dir, trainer, model, started, val, test, extra)


def _speed_report(timer: EpochTimer) -> dict[str, Any]:
    """Training throughput (images per second over all epochs, validation excluded) and peak memory."""
    import resource

    seconds = sum(e["seconds"] for e in timer.epochs)
    images = sum(e["images"] for e in timer.epochs)
    report: dict[str, Any] = {
        "train_epoch_seconds": [round(e["seconds"], 3) for e in timer.epochs],
        "train_images_per_s": round(images / seconds, 2) if seconds else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if torch.cuda.is_available():
        report["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return report


def _fit(trainer, model, datamodule, ckpt: str | None) -> None:
    """``trainer.fit``; an interrupt (SIGINT/SIGTERM) that saved a checkpoint becomes RunInterrupted."""
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt)
    except SystemExit as exc:  # Lightning turns SIGINT and SIGTERM into SystemExit
        saver = next(c for c in trainer.callbacks if isinstance(c, SaveOnInterrupt))
        if not saver.saved:
            raise
        signal_name = "SIGTERM" if isinstance(exc, SIGTERMException) else "SIGINT"
        raise RunInterrupted(
            f"{signal_name}: stopped at epoch {trainer.current_epoch}, step {trainer.global_step}; state saved "
            f"to {saver.path}; resume with ckpt_path=last",
            143 if signal_name == "SIGTERM" else 130,
        ) from None


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
