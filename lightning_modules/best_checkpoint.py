"""The rule that picks a run's best model: the highest validation accuracy, ties broken by the lower
validation loss.

Accuracy alone ties often on small validation splits (30 images at 100% after an epoch that has
barely trained), and Lightning's ``ModelCheckpoint`` keeps the earliest of equal scores: the "best"
model could then be one whose probabilities are near 0.5. The loss is a proper score, so among
epochs that classify the validation split equally well it prefers the one that is most confidently
right. Lightning's checkpoint callback takes one monitored value, hence this subclass.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

RULE = "highest validation accuracy; among equal accuracies, the lowest validation loss"
FILENAME = "best-epoch{epoch:03d}-acc{val/acc:.4f}"


def best_epoch(path: str | Path | None) -> int | None:
    """The epoch (0-based) of a checkpoint this callback wrote, from its name; None for any other file
    (a WiSE-FT or soup model, ``last.ckpt``)."""
    found = re.fullmatch(r"best-epoch(\d+)-acc[\d.]+(-v\d+)?\.ckpt", Path(path).name) if path else None
    return int(found.group(1)) if found else None


def better(acc: float, loss: float, best_acc: float, best_loss: float) -> bool:
    """Whether (acc, loss) beats the best so far under ``RULE``."""
    return acc > best_acc or (acc == best_acc and loss < best_loss)


class BestCheckpoint(ModelCheckpoint):
    """``best-epoch<E>-acc<A>.ckpt``: the one checkpoint of the run chosen by ``RULE``."""

    def __init__(self, dirpath: str | Path):
        super().__init__(
            dirpath=dirpath,
            filename=FILENAME,
            auto_insert_metric_name=False,
            monitor="val/acc",
            mode="max",
        )
        self.best_loss = math.inf

    def check_monitor_top_k(self, trainer: Trainer, current: Tensor | None = None) -> bool:
        if current is None:
            return False
        loss = trainer.callback_metrics.get("val/loss")
        loss = float(loss) if loss is not None and math.isfinite(float(loss)) else math.inf
        if self.best_model_score is None or not self.best_k_models:
            decision = True
        else:
            decision = better(float(current), loss, float(self.best_model_score), self.best_loss)
        # every DDP rank must take the same decision (they see the same synced metrics)
        decision = trainer.strategy.reduce_boolean_decision(bool(decision))
        if decision:
            self.best_loss = loss
        return decision

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"best_loss": self.best_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_loss = float(state_dict.get("best_loss", math.inf))
