"""Applying a :class:`~lightning_modules.schedule.Plan`: trainable blocks, frozen BatchNorm, logs.

Lightning's ``BaseFinetuning`` is not used because it adds optimizer parameter groups when it
unfreezes (resumed runs stay frozen, Lightning #21901; schedulers break, #8720), and its
``freeze_module`` leaves frozen BatchNorm in batch-statistics mode. Here every group the plan
ever trains is in the optimizer from the start (frozen parameters simply have no gradient).

DDP only synchronises parameters that require gradients when it wraps the model (#20340), so a
fit never crosses a phase boundary: ``pipeline.runner.phases`` runs one fit per phase, and
:class:`ApplyPlan` applies the phase's trainable set in ``setup``, before the strategy wraps the
model, and refuses an epoch outside its phase.
"""

from __future__ import annotations

import math
from collections.abc import Collection

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_modules.lora import is_adapter
from lightning_modules.schedule import Plan, PlanError
from lightning_modules.tensorboard_views import tensorboard_writer


def set_trainable(blocks: nn.ModuleList, trained: Collection[int], train_bn: bool, adapter_only: bool = False) -> None:
    """Let the blocks of index ``trained`` train; BatchNorm of trainable blocks trains only if ``train_bn``;
    with ``adapter_only`` (finetune.method=lora) only their LoRA adapters train, never the base weights."""
    for index, block in enumerate(blocks):
        trainable = index in trained
        for name, module in block.named_modules():
            is_bn = isinstance(module, _BatchNorm)
            allowed = is_adapter(name) if adapter_only else (train_bn or not is_bn)
            for param in module.parameters(recurse=False):
                param.requires_grad = trainable and allowed


def set_frozen_eval(blocks: nn.ModuleList, trained: Collection[int], train_bn: bool) -> None:
    """Put frozen blocks (and frozen BatchNorm layers) in eval mode, so they use running stats."""
    for index, block in enumerate(blocks):
        if index not in trained:
            block.eval()
        elif not train_bn:
            for module in block.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class ApplyPlan(Callback):
    """Runs phase ``index`` of ``plan`` in one fit: applies its trainable blocks, and is the only
    writer of learning rates (as fastai's ``ParamScheduler``): before every training step it sets
    each optimizer group's rate to the plan's at the global step, so a resume (mid-epoch included)
    or a changed plan gets exactly the plan's rate, with no scheduler state to restore. Logs
    ``lr/<group>`` per step and ``trainable_params`` per epoch."""

    def __init__(self, plan: Plan, index: int):
        self.plan = plan
        self.index = index
        self.phase = plan.phases[index]
        self.steps_per_epoch = 0  # known when the fit's training starts

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            pl_module.set_trainable_blocks(self.phase.trained(self.plan.n_blocks))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Optimizer steps per epoch, counted as Lightning does, once the train loader exists (asking
        # before a resumed fit restores its epoch would build the loader and shuffle that epoch wrongly).
        self.steps_per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        writer = tensorboard_writer(trainer)
        if writer is not None and trainer.is_global_zero and trainer.current_epoch == self.phase.start:
            text = f"{self.plan.phase_text(self.index)}; {count_trainable(pl_module):,} trainable parameters"
            writer.add_text("freeze_schedule", text, trainer.global_step)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.phase.start <= trainer.current_epoch < self.phase.end:
            raise RuntimeError(
                f"epoch {trainer.current_epoch} is outside phase {self.index} (epochs {self.phase.start}-"
                f"{self.phase.end - 1}); run one fit per phase (pipeline.runner.phases does)"
            )
        # The plan's position is global_step / steps_per_epoch: it must agree with the epoch (it
        # would not after a resume with another batch size, device count or limit_train_batches).
        spe = self.steps_per_epoch
        if not 0 <= trainer.global_step - trainer.current_epoch * spe < spe:
            raise PlanError(
                f"global step {trainer.global_step} does not fit epoch {trainer.current_epoch} at {spe} steps per "
                "epoch, so the learning-rate plan would be off; resume with the batch size, devices and "
                "trainer.limit_train_batches the run started with"
            )
        pl_module.log("trainable_params", float(count_trainable(pl_module)), on_step=False, on_epoch=True)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        rates = {}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.plan.lr(group["name"], trainer.global_step, self.steps_per_epoch)
                rates.setdefault(f"lr/{group['name']}", group["lr"])  # decay/no-decay twins share a rate
        pl_module.log_dict(rates, on_step=True, on_epoch=False, batch_size=1)
