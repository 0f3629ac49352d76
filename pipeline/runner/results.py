"""What a run leaves behind: ``config.yaml`` and ``plan.png`` with its plan, ``test_predictions.csv``, and
``metrics.json``, which the hyperparameter view of TensorBoard (and MLflow) receive too."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from lightning_modules.classifier import TransferClassifier
from lightning_modules.figures import as_tensor, png_bytes
from lightning_modules.freeze_schedule import count_trainable
from lightning_modules.plan_figure import plan_figure
from lightning_modules.run_safety import EpochTimer
from lightning_modules.schedule import Plan
from lightning_modules.tensorboard_views import hparams_table, tensorboard_writer
from pipeline.config.load import flatten_keys, to_yaml
from pipeline.mlflow_logging import log_results
from pipeline.runner.evaluation import INTERVALS, Evaluation, write_predictions
from pipeline.runner.run_dir import RunFolder

# what the model logs as a scalar per split (classifier._metrics, the loss): the HParams table's columns
SCALARS = ("acc", "loss", "f1", "auroc", "ece")


def write_config(cfg: DictConfig, run: RunFolder, plan: Plan | None = None) -> None:
    """``config.yaml``: the resolved config and, for training stages, the plan."""
    run.write_text("config.yaml", to_yaml(cfg, plan))


def write_plan(run: RunFolder, plan: Plan, trainer: Trainer | None = None) -> None:
    """``plan.png`` (and, given the trainer, TensorBoard's ``plan`` image): the plan as it runs."""
    image = plan_figure(plan)
    run.write_bytes("plan.png", png_bytes(image))
    writer = tensorboard_writer(trainer) if trainer is not None and trainer.is_global_zero else None
    if writer is not None:
        writer.add_image("plan", as_tensor(image), 0)


def record_predictions(
    trainer: Trainer, run: RunFolder, model: TransferClassifier, files: list[str], result: Evaluation
) -> dict[str, Any]:
    """``test_predictions.csv`` (global rank zero); its path for metrics.json."""
    if result.test_predictions is None or not trainer.is_global_zero:
        return {}
    path = run / "test_predictions.csv"
    write_predictions(path, files, model.class_names, model.binary, result.test_predictions)
    return {"test_predictions": str(path)}


def speed_report(timer: EpochTimer) -> dict[str, Any]:
    """Training throughput (images per second over all epochs, validation excluded) and peak memory."""
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


def write_results(
    cfg: DictConfig,
    run: RunFolder,
    trainer: Trainer,
    model: TransferClassifier,
    started: float,
    val: dict | None,
    test: dict | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``metrics.json`` and the loggers' hyperparameter view; returns the metrics."""
    metrics = {
        "stage": cfg.stage,
        "backbone": cfg.model.backbone,
        "epochs": int(trainer.current_epoch),
        "wall_time_s": round(time.time() - started, 2),
        "val": val,
        "test": test,
        "intervals": INTERVALS,
        "trainable_params": count_trainable(model),
        "run_dir": str(run),
        **(extra or {}),
    }
    if not trainer.is_global_zero:
        return metrics
    run.write_json("metrics.json", metrics)
    hp_metrics = {
        f"hparams/{split}_{k}": v
        for split, d in (("val", val), ("test", test))
        if d
        for k, v in d.items()
        if k != "count" and isinstance(v, (int, float))
    }
    flat = {
        k: (v if isinstance(v, (int, float, str, bool)) else str(v))
        for k, v in flatten_keys(OmegaConf.to_container(cfg, resolve=True)).items()
    }
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            hparams_table(
                logger,
                flat,
                [f"{split}/{k}" for split, d in (("val", val), ("test", test)) if d for k in d if k in SCALARS],
            )
        else:  # MLflow: params, metrics and the files a reader of the run needs
            files = [Path(p) for p in (metrics.get("best_ckpt"), metrics.get("ckpt_path")) if p]
            files += [run / "metrics.json", run / "config.yaml"]
            log_results(logger, flat, hp_metrics, files)
        logger.finalize("success")
    return metrics
