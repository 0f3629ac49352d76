"""Proof, at every epoch, that DDP replicas hold the same weights, at a cost independent of the model.

Each rank hashes every floating-point tensor of its state dict (BLAKE2b over the raw bytes, 8
bytes kept), one tensor at a time, and the ranks all-gather only those digests: a few bytes per
tensor instead of the whole model (ConvNeXt-T on 8 GPUs: 1.5 KB per rank instead of about 0.9 GB).
A single differing bit in any weight changes that tensor's digest.
"""

from __future__ import annotations

import hashlib

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn


def tensor_digests(state: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """Names and 64-bit digests of the floating-point tensors of ``state`` (exact, bitwise)."""
    names, digests = [], []
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        raw = tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()
        digests.append(int.from_bytes(hashlib.blake2b(raw.tobytes(), digest_size=8).digest(), "little", signed=True))
        names.append(name)
    return names, torch.tensor(digests, dtype=torch.int64)


def differing_tensors(gathered: torch.Tensor) -> torch.Tensor:
    """``gathered``: digests of every rank ``(world, tensors)``; True where a rank differs from rank 0."""
    return (gathered != gathered[0:1]).any(dim=0)


class ReplicaAgreement(Callback):
    """At the end of each training epoch of a multi-process run, compares the digests of every
    rank's tensors and logs how many tensors differ from rank zero's as
    ``ddp/differing_tensors``. DDP keeps replicas bit-identical, so anything above zero means
    some parameter trained without gradient synchronisation (the failure mode of Lightning #20340)."""

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size < 2:
            return
        names, digests = tensor_digests(pl_module.state_dict())
        gathered = trainer.strategy.all_gather(digests.to(pl_module.device)).cpu()
        differ = differing_tensors(gathered)
        count = int(differ.sum())
        pl_module.log("ddp/differing_tensors", float(count), on_step=False, on_epoch=True, sync_dist=False)
        if count:
            first = names[int(torch.nonzero(differ)[0])]
            rank_zero_warn(
                f"epoch {trainer.current_epoch}: {count} tensor(s) differ between DDP replicas (first: {first}); "
                "some parameters trained without gradient synchronisation"
            )
