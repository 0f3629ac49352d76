"""Callbacks and plugins that keep a run's state safe: interrupts, atomic checkpoints, seeding."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from core.atomic_io import torch_save_atomic
from core.errors import UserError


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite; the message is one line."""

    exit_code = 3


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint through ``atomic_io``: a per-process temporary file in the same folder,
    fsync'ed and renamed over the old one, so a crash never leaves a truncated file where a good
    one was, and a full disk is one ``DiskFullError`` line with no temporary file left. (Lightning's
    own ``_atomic_save`` only buffers in memory before writing the target file in place.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        torch_save_atomic(checkpoint, path)


class SaveOnInterrupt(Callback):
    """On Ctrl+C (SIGINT) or SIGTERM, stops at the next step boundary and writes ``last.ckpt`` with
    the current state (mid-epoch included), so ``ckpt_path=last`` continues from that step.

    SIGINT is handled like SIGTERM: it only sets Lightning's flag, which the training loop checks
    after each step and rank zero broadcasts, so every DDP rank stops at the same step and none is
    inside an all-reduce while the checkpoint is written (a raw KeyboardInterrupt can arrive in
    one). A second Ctrl+C interrupts at once."""

    def __init__(self, checkpoint_dir: Path):
        self.path = Path(checkpoint_dir) / "last.ckpt"
        self.saved = False
        self.signal_name = "SIGTERM"
        self._previous: Any = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.signal_name = "SIGINT"
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second Ctrl+C: KeyboardInterrupt
        handler = signal.getsignal(signal.SIGTERM)  # Lightning's, registered for the fit
        if not callable(handler):
            raise KeyboardInterrupt
        handler(signal.SIGTERM, frame)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit":
            return
        # a raw KeyboardInterrupt (second Ctrl+C) under DDP may have stopped a rank inside a
        # collective: saving then could hang, so only a single process saves on it
        if isinstance(exception, SIGTERMException) or (
            isinstance(exception, KeyboardInterrupt) and trainer.world_size == 1
        ):
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
        if batch is not None:  # None: every image of the batch became unreadable (image_folder.collate_readable)
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
