"""Proof, at every epoch, that DDP replicas hold the same weights."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn


class ReplicaAgreement(Callback):
    """At the end of each training epoch of a multi-process run, gathers every floating-point
    tensor of the model from all ranks and logs the largest difference to rank zero's copy as
    ``ddp/max_weight_diff``. DDP keeps replicas bit-identical, so anything above zero means some
    parameter trained without gradient synchronisation (the failure mode of Lightning #20340)."""

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size < 2:
            return
        with torch.no_grad():
            flat = torch.cat([t.reshape(-1).float() for t in pl_module.state_dict().values() if t.is_floating_point()])
            gathered = trainer.strategy.all_gather(flat)
            diff = (gathered - gathered[0:1]).abs().max()
        pl_module.log("ddp/max_weight_diff", diff, on_step=False, on_epoch=True, sync_dist=False)
        if diff.item() > 0:
            rank_zero_warn(
                f"epoch {trainer.current_epoch}: DDP replicas differ by up to {diff.item():.3g}; "
                "some parameters trained without gradient synchronisation"
            )
