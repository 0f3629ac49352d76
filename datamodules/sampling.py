"""Samplers that make 1-process and N-process runs see the same data.

Lightning's automatic sampler replacement is switched off (``use_distributed_sampler=False``)
because (a) in one process it shuffles with a RandomSampler, so an N-process run and a
1-process run with an N-times larger batch see different batches, and (b) its evaluation
sampler pads the last shard with repeated images, which would count some test images twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


def _rank_and_world(trainer: Trainer | None) -> tuple[int, int]:
    if trainer is None:
        return 0, 1
    return trainer.global_rank, trainer.world_size


class EpochIndexSampler(DistributedSampler):
    """A DistributedSampler that yields ``(epoch, index)``, so a dataset can seed each sample's
    augmentation from the epoch and the index (see ``LabeledImages``), and that can resume in
    the middle of an epoch by skipping the indices already consumed."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._skip: dict[int, int] = {}

    def skip(self, epoch: int, consumed: int) -> None:
        """The next iteration over ``epoch`` starts after its first ``consumed`` indices."""
        self._skip = {epoch: consumed}

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        indices = list(super().__iter__())[self._skip.pop(epoch, 0) :]
        return ((epoch, index) for index in indices)


class ResumableLoader(DataLoader):
    """A training DataLoader that Lightning treats as stateful: checkpoints store how many batches
    of the current epoch were consumed, and a resumed fit continues with the next batch."""

    def __init__(self, *args: Any, progress: Callable[[], int], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._progress = progress

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_done": int(self._progress())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.skip(state["epoch"], state["batches_done"] * self.batch_size)


class BalancedEpochSampler(EpochIndexSampler):
    """Class-balanced training: each epoch draws ``len(dataset)`` indices with replacement, every
    class equally likely, from a generator seeded by ``(seed, epoch)``. The same global sequence
    on every rank, each rank taking every ``world``-th index, and ``skip`` for a resumed epoch:
    the 1-vs-N-process and exact-resume guarantees of the plain sampler hold."""

    def __init__(self, dataset: Dataset, labels: list[int], **kwargs: Any):
        super().__init__(dataset, **kwargs)
        counts = torch.bincount(torch.tensor(labels))
        self.weights = (1.0 / counts.double())[torch.tensor(labels)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        generator = torch.Generator().manual_seed(self.seed + epoch)
        drawn = torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator).tolist()
        indices = drawn[self.rank : self.total_size : self.num_replicas][self._skip.pop(epoch, 0) :]
        return ((epoch, index) for index in indices)


def labels_of(dataset: Dataset) -> list[int]:
    """Class labels of a training dataset (image samples or cached features)."""
    if hasattr(dataset, "samples"):
        return [label for _, label in dataset.samples]
    return [int(y) for y in dataset.tensors[1]]  # TensorDataset(features, labels)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch) * 1_000_003 + index


def train_sampler(
    dataset: Dataset, trainer: Trainer | None, seed: int, with_epoch: bool = True, balanced: bool = False
) -> Sampler:
    """The same seeded permutation for any world size; rank ``r`` takes every ``world``-th index,
    so the union of one step's per-rank batches is the 1-process batch of ``world * B`` images.
    Lightning calls ``set_epoch`` on it at every epoch. ``with_epoch``: yield ``(epoch, index)``;
    ``balanced``: class-balanced draws (:class:`BalancedEpochSampler`)."""
    rank, world = _rank_and_world(trainer)
    common = dict(num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    if balanced:
        sampler = BalancedEpochSampler(dataset, labels_of(dataset), **common)
        if not with_epoch:  # cached features: plain indices
            sampler = _IndexOnly(sampler)
    else:
        sampler = (EpochIndexSampler if with_epoch else DistributedSampler)(dataset, **common)
    if trainer is not None:
        # Lightning creates the first iterator of a fit before it calls set_epoch, and loader
        # workers prefetch indices at once: start at the epoch the (possibly resumed) fit is in.
        sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
    return sampler


class _IndexOnly(Sampler):
    """A sampler of ``(epoch, index)`` pairs seen as plain indices (for datasets without epochs)."""

    def __init__(self, sampler: BalancedEpochSampler):
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        return (index for _, index in self.sampler)


def eval_sampler(dataset: Dataset, trainer: Trainer | None) -> Sampler | None:
    """Every image exactly once over all ranks (shards may differ in size by one)."""
    rank, world = _rank_and_world(trainer)
    if world == 1:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
