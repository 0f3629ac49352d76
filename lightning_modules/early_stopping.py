"""Early stopping of one phase of the plan, keeping that phase's best weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping

from lightning_modules.ema import PlanEMA


class PhaseEarlyStopping(EarlyStopping):
    """Lightning's ``EarlyStopping`` for phase ``index`` of the plan.

    Its state is keyed by the phase, so the next phase (resumed from the hand-over checkpoint)
    starts counting afresh. Whenever the monitored value improves, the whole training state is
    written to ``best_path`` (so it survives an interrupted and resumed phase); when the phase
    stopped, :meth:`restore_best` puts those weights and that optimizer state back."""

    def __init__(self, index: int, best_path: str | Path, **kwargs: Any):
        super().__init__(check_on_train_epoch_end=False, **kwargs)
        self.index = index
        self.best_path = Path(best_path)
        self.best_epoch: int | None = None
        self.best_loss = math.inf  # validation loss of best_epoch
        self.stopped = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(phase=self.index, monitor=self.monitor, mode=self.mode)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        previous = self.best_score.clone()
        super().on_validation_end(trainer, pl_module)
        loss = float(trainer.callback_metrics.get("val/loss", math.inf))
        improved = not torch.equal(self.best_score, previous)
        # validation accuracy ties: the lower loss is the better model (lightning_modules.best_checkpoint),
        # though only a real improvement resets the patience
        current = trainer.callback_metrics.get(self.monitor)
        tied = current is not None and self.monitor == "val/acc" and float(current) == float(self.best_score)
        if improved or (tied and loss < self.best_loss):
            self.best_epoch, self.best_loss = trainer.current_epoch, loss
            trainer.save_checkpoint(self.best_path)
        self.stopped = bool(trainer.should_stop)

    def restore_best(self, pl_module: LightningModule, trainer: Trainer) -> int | None:
        """Load the phase's best weights and optimizer state; returns that epoch (None: no
        validation ran in the phase, the weights stay as they are)."""
        if self.best_epoch is None or not self.best_path.is_file():
            return None
        best = torch.load(self.best_path, map_location="cpu", weights_only=True)
        averaging = [c for c in trainer.callbacks if isinstance(c, PlanEMA)] if "current_model_state" in best else []
        if averaging:  # weight EMA: the best epoch's raw weights and its average (lightning_modules.ema)
            averaging[0].restore(pl_module, best)
        else:
            pl_module.load_state_dict(best["state_dict"])
        for optimizer, state in zip(trainer.optimizers, best["optimizer_states"]):
            optimizer.load_state_dict(state)
        return self.best_epoch

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"best_epoch": self.best_epoch, "best_loss": self.best_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience  # the configured patience wins over a resumed checkpoint's
        super().load_state_dict(state_dict)
        self.patience = patience
        self.best_epoch = state_dict.get("best_epoch")
        self.best_loss = float(state_dict.get("best_loss", math.inf))
