"""One line, early in a long run, saying how long it will take at the speed measured so far."""

from __future__ import annotations

import time

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from core.words import count

MEASURE_STEPS = 5  # training steps timed (after the first, which pays for warm-up)
WORTH_SAYING_S = 120  # shorter runs need no forecast
FAST_ON_CPU = "efficientnet_lite0"


class TimeEstimate(Callback):
    """After ``MEASURE_STEPS`` timed steps of the first epoch, prints the estimated minutes per epoch
    and for the stage (``epochs`` in all), when that is over ``WORTH_SAYING_S``; on a CPU it names a
    faster backbone. The measured steps train the head only when the run starts frozen, so later
    phases that unfreeze blocks take longer: the line says so."""

    def __init__(self, backbone: str, image_size: int, epochs: int, on_cpu: bool, done: bool = False):
        self.backbone, self.image_size, self.epochs, self.on_cpu = backbone, image_size, epochs, on_cpu
        self.done = done  # one line per run (later phases and resumed runs say nothing more)
        self._start: float | None = None
        self._steps = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if not self.done and self._start is None and batch_idx == 1:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.done or self._start is None:
            return
        self._steps += 1
        if self._steps < MEASURE_STEPS:
            return
        self.done = True
        per_step = (time.perf_counter() - self._start) / self._steps
        batches = trainer.num_training_batches
        # validation: about a third of a training step per batch (no backward pass), as many batches as it has
        val_batches = sum(trainer.num_val_batches) if trainer.num_val_batches else 0
        per_epoch = per_step * batches + per_step / 3 * val_batches
        total = per_epoch * self.epochs
        if total < WORTH_SAYING_S:
            return
        where = "this CPU" if self.on_cpu else "this device"
        hint = (
            f"; model.backbone={FAST_ON_CPU} is faster here"
            if self.on_cpu and self.backbone != FAST_ON_CPU and not self.backbone.startswith("efficientnet_lite")
            else ""
        )
        rank_zero_info(
            f"{self.backbone} at {self.image_size} px on {where}: about {per_epoch / 60:.1f} min per epoch, "
            f"{_duration(total)} for the stage's {count(self.epochs, 'epoch')} (measured on its first steps; "
            f"epochs that train more blocks take longer){hint}"
        )


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"
