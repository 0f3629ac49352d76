"""Samplers that make 1-process and N-process runs see the same data.

Lightning's automatic sampler replacement is switched off (``use_distributed_sampler=False``)
because (a) in one process it shuffles with a RandomSampler, so an N-process run and a
1-process run with an N-times larger batch see different batches, and (b) its evaluation
sampler pads the last shard with repeated images, which would count some test images twice.
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, DistributedSampler, Sampler


def _rank_and_world(trainer: Trainer | None) -> tuple[int, int]:
    if trainer is None:
        return 0, 1
    return trainer.global_rank, trainer.world_size


def train_sampler(dataset: Dataset, trainer: Trainer | None, seed: int) -> DistributedSampler:
    """The same seeded permutation for any world size; rank ``r`` takes every ``world``-th index,
    so the union of one step's per-rank batches is the 1-process batch of ``world * B`` images.
    Lightning calls ``set_epoch`` on it at every epoch."""
    rank, world = _rank_and_world(trainer)
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)


def eval_sampler(dataset: Dataset, trainer: Trainer | None) -> Sampler | None:
    """Every image exactly once over all ranks (shards may differ in size by one)."""
    rank, world = _rank_and_world(trainer)
    if world == 1:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
