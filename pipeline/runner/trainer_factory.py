"""Build ``lightning.Trainer`` objects from the config: devices, precision, DDP details, callbacks."""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from core.errors import ConfigError
from core.progress import is_terminal
from datamodules.image_folder import available_cores
from lightning_modules.best_checkpoint import BestCheckpoint
from lightning_modules.epoch_log import EvaluationProgress
from lightning_modules.replica_check import ReplicaAgreement
from lightning_modules.run_safety import AtomicCheckpointIO, SaveOnInterrupt, StepSeed
from lightning_modules.tensorboard_views import TensorBoardViews
from pipeline.mlflow_logging import mlflow_logger

# Callbacks that whoever runs the stage adds to every Trainer it builds (a search trial's pruning,
# pipeline/studies/trial.py), without the stages knowing about them.
_ADDED: contextvars.ContextVar[tuple[Callable[[], Any], ...]] = contextvars.ContextVar("added", default=())


@contextlib.contextmanager
def added_callbacks(*factories: Callable[[], Any]) -> Iterator[None]:
    """Every Trainer built inside the block also gets ``factory()`` of each of ``factories``."""
    token = _ADDED.set(_ADDED.get() + factories)
    try:
        yield
    finally:
        _ADDED.reset(token)


def on_gpu(cfg: DictConfig) -> bool:
    return str(cfg.trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def auto_precision(cfg: DictConfig) -> str:
    """bf16-mixed (or 16-mixed) on a CUDA GPU, full precision elsewhere."""
    if on_gpu(cfg):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def expected_world_size(cfg: DictConfig) -> int:
    """Processes the Trainer will start: devices per node x nodes (``auto``: all GPUs, or 1 CPU)."""
    devices = cfg.trainer.get("devices", "auto")
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        per_node = devices
    elif OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        per_node = len(devices)
    else:  # "auto" or -1
        per_node = torch.cuda.device_count() if on_gpu(cfg) else 1
    return per_node * int(cfg.trainer.get("num_nodes", 1))


def batchnorm_trains(model: nn.Module) -> bool:
    return any(
        isinstance(m, _BatchNorm) and any(p.requires_grad for p in m.parameters(recurse=False)) for m in model.modules()
    )


def resolve_sync_batchnorm(cfg: DictConfig, model: nn.Module) -> bool:
    """``trainer.sync_batchnorm`` if set; otherwise on for multi-GPU phases in which BatchNorm trains.

    torch's SyncBatchNorm only runs on GPUs, so an explicit ``true`` on CPU is refused when it
    would matter (a BatchNorm layer trains)."""
    explicit = cfg.trainer.get("sync_batchnorm")
    trains = batchnorm_trains(model)
    if explicit is None:
        return trains and on_gpu(cfg) and expected_world_size(cfg) > 1
    if explicit and trains and not on_gpu(cfg) and expected_world_size(cfg) > 1:
        raise ConfigError("trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm does not run on CPU)")
    return bool(explicit)


def apply_speed_settings(cfg: DictConfig) -> None:
    """Process-wide defaults: cuDNN autotuning and TF32 matmuls on GPU; one thread per core on CPU."""
    if on_gpu(cfg):
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    else:
        torch.set_num_threads(available_cores())


def make_trainer(
    cfg: DictConfig,
    run_dir: Path,
    callbacks: list,
    model: nn.Module | None = None,
    purge_step: int | None = None,
    **overrides: Any,
) -> Trainer:
    """A Trainer logging to ``run_dir`` with checkpoints (written atomically, and on SIGINT/SIGTERM),
    per-step seeding and the DDP replica check (``trainer.enable_checkpointing=false``: no
    best/last checkpoint callbacks; the runner still writes its phase hand-over checkpoint).

    ``model`` (with this phase's trainable set applied) decides the sync_batchnorm default;
    ``purge_step`` (a resumed run's step) hides events a killed run logged after its checkpoint."""
    logger = TensorBoardLogger(
        save_dir=str(run_dir.parent.parent),
        name=run_dir.parent.name,
        version=run_dir.name,
        default_hp_metric=False,
        **({"purge_step": purge_step} if purge_step is not None else {}),
    )
    kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True) | overrides
    checkpoints = []
    if kwargs.get("enable_checkpointing", True):
        checkpoints = _checkpoint_callbacks(run_dir)
    # a bar redrawn in a file is megabytes of carriage returns: EpochLog prints a line per epoch instead
    kwargs.setdefault("enable_progress_bar", is_terminal())
    if kwargs.get("precision", "auto") == "auto":
        kwargs["precision"] = auto_precision(cfg)
    if model is not None:
        kwargs["sync_batchnorm"] = resolve_sync_batchnorm(cfg, model)
    # The datamodules bring their own samplers (datamodules/sampling.py).
    kwargs["use_distributed_sampler"] = False
    all_callbacks = [
        *checkpoints,
        ReplicaAgreement(),
        SaveOnInterrupt(run_dir / "checkpoints"),
        StepSeed(cfg.seed),
        TensorBoardViews(cfg.log.images_every_n_epochs, cfg.log.max_images),
        EvaluationProgress(),
        *callbacks,
        *(make() for make in _ADDED.get()),
    ]
    loggers = [logger]
    if cfg.log.mlflow:
        loggers.append(mlflow_logger(cfg, run_dir))
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # Lightning's auto-requeue only when asked for (slurm_requeue=true)
        plugins.append(SLURMEnvironment(auto_requeue=bool(cfg.slurm_requeue)))
    # Lightning loads the newest hpc_ckpt_N.ckpt of default_root_dir into any fit or test under
    # SLURM: the run folder holds only this run's (the working directory may hold anyone's)
    kwargs.setdefault("default_root_dir", str(run_dir))
    return Trainer(logger=loggers, callbacks=all_callbacks, plugins=plugins, **kwargs)


def _checkpoint_callbacks(run_dir: Path) -> list[ModelCheckpoint]:
    best = BestCheckpoint(run_dir / "checkpoints")  # validation accuracy, ties: the lower validation loss
    # Lightning 2.6's save_last only rewrites last.ckpt in epochs that also saved a top-k
    # checkpoint; an unmonitored top-1 checkpoint named "last" is rewritten every epoch.
    last = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", enable_version_counter=False)
    return [best, last]


@contextlib.contextmanager
def intended_warnings() -> Iterator[None]:
    """Lightning's warnings that this project's design triggers on purpose, around its fits and the
    evaluation of a best checkpoint: frozen blocks are in eval mode at the start of training; every
    phase's fit reuses the run's checkpoint folder; a checkpoint saved in an earlier phase names that
    phase's early stopping, which later fits and the evaluation do not have (each phase has its own)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
        warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
        warnings.filterwarnings("ignore", message=r".*callbacks used to create the checkpoint need to be provided.*")
        yield
