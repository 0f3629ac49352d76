"""Callbacks and plugins that keep a run's state safe: interrupts, atomic checkpoints, seeding."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message is one line."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the same folder, then renames it over the old
    one: a crash while writing never leaves a truncated file where a good one was. (Lightning's
    own ``_atomic_save`` only buffers in memory before writing the target file in place.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class SaveOnInterrupt(Callback):
    """On Ctrl+C (SIGINT) or SIGTERM, writes ``last.ckpt`` with the current state (mid-epoch
    included), so ``ckpt_path=last`` continues from the step where the run stopped."""

    def __init__(self, checkpoint_dir: Path):
        self.path = Path(checkpoint_dir) / "last.ckpt"
        self.saved = False

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.path)
            self.saved = True
            rank_zero_info(
                f"interrupted at epoch {trainer.current_epoch}, step {trainer.global_step}: saved {self.path}"
            )


class StepSeed(Callback):
    """Re-seeds every RNG before each training step from (seed, step, rank): dropout and anything
    else random in the main process depends on the step only, so a resumed run repeats it exactly
    (image augmentation is seeded per sample, see ``LabeledImages``)."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step_seed = (self.seed * 1_000_003 + trainer.global_step) * 64 + trainer.global_rank
        seed_everything(step_seed % 2**32, verbose=False)


class EpochTimer(Callback):
    """Wall time of every training epoch (without validation) and the images it trained on."""

    def __init__(self):
        self.epochs: list[dict[str, float]] = []
        self._started = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started, self._images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += int(batch[1].shape[0]) * trainer.world_size

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close(trainer)

    def _close(self, trainer: Trainer) -> None:
        if self._started and trainer.state.fn == "fit" and not trainer.sanity_checking:
            seconds = time.perf_counter() - self._started
            self.epochs.append({"epoch": trainer.current_epoch, "seconds": seconds, "images": self._images})
            self._started = 0.0
