"""Weight EMA across the phases of a plan: Lightning's ``EMAWeightAveraging``, adapted.

Lightning's callback averages the weights of one fit, validates with the average, saves it as the
checkpoint's ``state_dict`` (the raw weights as ``current_model_state``) and copies it into the
model when the fit ends. A plan runs one fit per phase, handing over through ``last.ckpt``, so:

- the average is copied into the model only at the end of the last phase: a short head warm-up
  would otherwise hand the next phase an average still close to the random initial head;
- the hand-over checkpoint carries both, so the next phase (and a resumed run) continues the
  same average and the same raw weights;
- outside fitting (the final validation/test of the best checkpoint) it does nothing: that
  checkpoint's ``state_dict`` already is the average, and is what gets evaluated.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


class PlanEMA(EMAWeightAveraging):
    def __init__(self, decay: float, last_phase: bool):
        super().__init__(decay=decay)
        self.last_phase = last_phase
        # ema + (1 - decay) * (p - ema) rather than torch's decay * ema + (1 - decay) * p: the same
        # average, but a frozen weight (p == ema) stays bit for bit the pretrained one.
        self._kwargs["avg_fn"] = lambda ema, p, _n: ema + (1 - decay) * (p - ema)

    @staticmethod
    def _fitting(trainer: Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.last_phase:
            super().on_train_end(trainer, pl_module)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fitting(trainer):
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fitting(trainer):
            super().on_validation_epoch_end(trainer, pl_module)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._fitting(trainer):
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def restore(self, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Raw weights and average from a checkpoint this callback wrote (an early-stopped phase's best)."""
        average = {"module." + name: value for name, value in checkpoint["state_dict"].items()}
        self._average_model.load_state_dict(average | checkpoint["averaging_state"])
        pl_module.load_state_dict(checkpoint["current_model_state"])
        if self.last_phase:  # the fit has ended: the model is the average from now on
            self._copy_average_to_current(pl_module)
