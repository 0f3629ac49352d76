"""The freeze schedule: which backbone blocks train, as a pure function of stage and epoch.

Lightning's ``BaseFinetuning`` is not used because it adds optimizer parameter groups when it
unfreezes (resumed runs stay frozen, Lightning #21901; schedulers break, #8720), and its
``freeze_module`` leaves frozen BatchNorm in batch-statistics mode. Here every parameter is in
the optimizer from the start, frozen ones simply have no gradient, and the trainable set is
re-derived from the epoch at every fit start and epoch start.

DDP only synchronises parameters that require gradients when it wraps the model (#20340), so a
fit never crosses a phase boundary: ``pipeline.stages`` runs one fit per phase, and the callback
applies the phase's trainable set in ``setup``, before the strategy wraps the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class FreezeSchedule:
    """Stage ``finetune`` trains the top ``unfreeze_blocks`` blocks from ``warmup_epochs`` on;
    every other stage keeps the whole backbone frozen."""

    stage: str
    warmup_epochs: int = 0
    unfreeze_blocks: int = 0

    def trainable_blocks(self, epoch: int) -> int:
        if self.stage == "finetune" and epoch >= self.warmup_epochs:
            return self.unfreeze_blocks
        return 0

    def phases(self, start_epoch: int, max_epochs: int) -> list[tuple[int, int]]:
        """Epoch ranges ``[begin, end)`` from ``start_epoch`` with a constant trainable set."""
        cuts = sorted({start_epoch, max_epochs} | ({self.warmup_epochs} if self.stage == "finetune" else set()))
        cuts = [c for c in cuts if start_epoch <= c <= max_epochs]
        return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def set_trainable(blocks: nn.ModuleList, top: int, train_bn: bool) -> None:
    """Let the top ``top`` blocks train; BatchNorm of trainable blocks trains only if ``train_bn``."""
    first = len(blocks) - top
    for index, block in enumerate(blocks):
        trainable = index >= first
        for module in block.modules():
            is_bn = isinstance(module, _BatchNorm)
            for param in module.parameters(recurse=False):
                param.requires_grad = trainable and (train_bn or not is_bn)


def set_frozen_eval(blocks: nn.ModuleList, top: int, train_bn: bool) -> None:
    """Put frozen blocks (and frozen BatchNorm layers) in eval mode, so they use running stats."""
    first = len(blocks) - top
    for index, block in enumerate(blocks):
        if index < first:
            block.eval()
        elif not train_bn:
            for module in block.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class TrainableSchedule(Callback):
    """Applies :class:`FreezeSchedule` to ``pl_module`` (a ``TransferClassifier``)."""

    def __init__(self, schedule: FreezeSchedule, start_epoch: int = 0, strict: bool = True):
        self.schedule = schedule
        self.start_epoch = start_epoch
        self.strict = strict  # refuse a phase change inside a multi-process fit

    def _apply(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> bool:
        top = self.schedule.trainable_blocks(epoch)
        changed = top != pl_module.trainable_top
        if changed and trainer.world_size > 1 and self.strict:
            raise RuntimeError(
                f"the trainable set changes at epoch {epoch} inside a multi-process fit; "
                "run one fit per phase (pipeline.stages does)"
            )
        pl_module.set_trainable_top(top)
        return changed

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            pl_module.set_trainable_top(self.schedule.trainable_blocks(self.start_epoch))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # trainer.current_epoch is not final yet when resuming (the loop advances it later),
        # so the phase's set from ``setup`` is kept; on_train_epoch_start re-checks it.
        self._log_event(trainer, pl_module, self.start_epoch)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._apply(trainer, pl_module, trainer.current_epoch):
            self._log_event(trainer, pl_module, trainer.current_epoch)
        pl_module.log("trainable_params", float(count_trainable(pl_module)), on_step=False, on_epoch=True)

    @staticmethod
    def _log_event(trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        top = pl_module.trainable_top
        n_blocks = len(pl_module.backbone.blocks)
        what = "backbone frozen" if top == 0 else f"top {top} of {n_blocks} backbone blocks trainable"
        text = f"epoch {epoch}: {what}; {count_trainable(pl_module):,} trainable parameters"
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text("freeze_schedule", text, trainer.global_step)
