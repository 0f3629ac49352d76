"""Every image's evaluation logits and target, kept by a callback that only the final evaluation
(``pipeline.runner.evaluation``) attaches: training's validation epochs keep nothing."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def gather_cat(trainer: Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a rank-local tensor of any length over all ranks (padding for all_gather)."""
    if trainer.world_size < 2:
        return tensor
    length = torch.tensor([tensor.shape[0]], device=tensor.device)
    lengths = trainer.strategy.all_gather(length).view(-1)
    if int(lengths.max()) == 0:
        return tensor
    padded = torch.zeros((int(lengths.max()), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = trainer.strategy.all_gather(padded)
    return torch.cat([gathered[r, : int(n)] for r, n in enumerate(lengths)])


def in_dataset_order(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """Rows gathered rank after rank put back in dataset order: the evaluation sampler gives rank
    ``r`` the indices ``r, r + W, r + 2W, ...`` (``datamodules.sampling.eval_sampler``)."""
    order = torch.tensor([i for r in range(world) for i in range(r, len(tensor), world)], dtype=torch.long)
    ordered = torch.empty_like(tensor)
    ordered[order] = tensor
    return ordered


class CollectOutputs(Callback):
    """For each ``validate`` / ``test`` of the trainer it is attached to, every image's logits (as
    evaluated, uncalibrated) and target, gathered over ranks in dataset order: ``outputs["val"]``,
    ``outputs["test"]``. The step outputs it reads are ``TransferClassifier``'s."""

    def __init__(self) -> None:
        self.outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _start(self, pl_module: LightningModule) -> None:
        # The evaluation fits the temperature afresh on uncalibrated logits (a resumed run's best
        # checkpoint may hold the temperature an earlier evaluation stored).
        pl_module.temperature.fill_(1.0)
        self._batches = []

    def _keep(self, outputs: dict[str, Any]) -> None:
        self._batches.append((outputs["logits"], outputs["target"]))

    def _gather(self, trainer: Trainer, pl_module: LightningModule, split: str) -> None:
        # Every rank joins the gathers, also one whose shard had no batch.
        width = 1 if pl_module.binary else len(pl_module.class_names)
        batches, self._batches = self._batches, []
        logits = torch.cat([b[0] for b in batches]) if batches else torch.zeros((0, width))
        targets = torch.cat([b[1] for b in batches]) if batches else torch.zeros((0,), dtype=torch.long)
        logits = gather_cat(trainer, logits.to(pl_module.device)).cpu()
        targets = gather_cat(trainer, targets.to(pl_module.device)).cpu()
        world = trainer.world_size
        self.outputs[split] = (in_dataset_order(logits, world), in_dataset_order(targets, world))

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(pl_module)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx=0
    ) -> None:
        self._keep(outputs)

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx=0
    ) -> None:
        self._keep(outputs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._gather(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._gather(trainer, pl_module, "test")
