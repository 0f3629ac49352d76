"""Early stopping of one phase of the plan, remembering that phase's best weights."""

from __future__ import annotations

import copy

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping


class PhaseEarlyStopping(EarlyStopping):
    """Lightning's ``EarlyStopping`` for phase ``index``: its state is keyed by the phase (so the
    next phase, resumed from the hand-over checkpoint, starts counting afresh), and it keeps a
    copy of the weights and optimizer state of the phase's best epoch, which
    :meth:`restore_best` puts back when the phase stopped early."""

    def __init__(self, index: int, **kwargs):
        super().__init__(check_on_train_epoch_end=False, **kwargs)
        self.index = index
        self.best_epoch: int | None = None
        self._best_model: dict[str, torch.Tensor] | None = None
        self._best_optimizers: list[dict] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(phase=self.index, monitor=self.monitor, mode=self.mode)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        previous = self.best_score.clone()
        super().on_validation_end(trainer, pl_module)
        if not torch.equal(self.best_score, previous):  # this epoch is the phase's best so far
            self.best_epoch = trainer.current_epoch
            self._best_model = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
            self._best_optimizers = [copy.deepcopy(o.state_dict()) for o in trainer.optimizers]

    def restore_best(self, pl_module: LightningModule, trainer: Trainer) -> int | None:
        """Load the phase's best weights and optimizer state; returns that epoch (None: no
        validation ran in the phase, the weights stay as they are)."""
        if self._best_model is None:
            return None
        pl_module.load_state_dict(self._best_model)
        for optimizer, state in zip(trainer.optimizers, self._best_optimizers):
            optimizer.load_state_dict(state)
        return self.best_epoch
