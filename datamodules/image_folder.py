"""The image LightningDataModule: loaders over the samples of a ``SplitIndex``
(``datamodules.data_index``), decoded as RGB and augmented for training only."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.accelerators import CPUAccelerator
from torch.utils.data import DataLoader, Dataset, default_collate

from datamodules.data_index import SplitIndex
from datamodules.decoded_cache import decoded_cache, open_decoded
from datamodules.image_io import load_rgb, unreadable_reason
from datamodules.layout import ChangedSinceScan, changed_since_scan
from datamodules.sampling import ResumableLoader, eval_sampler, sample_seed, train_sampler
from datamodules.transforms import eval_transform, train_transform
from datamodules.workers import worker_options


class LabeledImages(Dataset):
    """``(path, label)`` samples decoded as RGB and passed through ``transform``.

    Indexed with ``(epoch, index)`` (from ``EpochIndexSampler``), the transform's randomness is
    seeded from ``(seed, epoch, index)``: the augmentation of a sample does not depend on worker
    processes, the number of devices, or where a run was resumed."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        transform: Callable,
        min_size: int | None = None,
        seed: int = 0,
        decoded: str | Path | None = None,
        skip_unreadable: bool = False,
        skip_log: str | Path | None = None,
    ):
        self.samples = samples
        self.transform = transform
        self.min_size = min_size
        self.seed = seed
        self.decoded = decoded  # a decoded-image cache file: read from it instead of decoding
        self._array = None
        # An image that became unreadable after the scan (deleted, truncated while the run starts):
        # training leaves it out (``None``, see ``collate_readable``) and lists it here and in a
        # warning; elsewhere every image has its place, so it is a ChangedSinceScan error.
        self.skip_unreadable = skip_unreadable
        self.unreadable: dict[str, str] = {}  # this process's skips: path -> reason
        self.skip_log = skip_log  # every process (loader workers, DDP ranks) appends its skips here

    def _image(self, index: int):
        if self.decoded is None:
            path = self.samples[index][0]
            try:
                return load_rgb(path, self.min_size)
            except Exception as err:  # noqa: BLE001 - as the scan's check: any decoder failure
                return self._unreadable(path, unreadable_reason(err))
        if self._array is None:  # opened lazily, once per loader worker
            self._array = open_decoded(self.decoded)
        return torch.from_numpy(np.array(self._array[index])).permute(2, 0, 1)

    def _unreadable(self, path: str, reason: str) -> None:
        if not self.skip_unreadable:
            raise changed_since_scan(path, reason)
        if path not in self.unreadable:  # each process lists its own skips (every DDP rank, every worker)
            self.unreadable[path] = reason
            if self.skip_log is not None:
                append_line(self.skip_log, f"{path}\t{reason}")
            warnings.warn(
                f"{path} became unreadable after the data scan ({reason}): left out of training", stacklevel=2
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int] | None:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        label = self.samples[index][1]
        image = self._image(index)
        if image is None:
            return None
        if epoch is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only (the transforms draw from it): torch.manual_seed would also queue a
            # seed for every CUDA device, with a stack trace each time (about 1.5 ms a sample on a
            # CPU), and change the GPU's RNG stream, which fork_rng(devices=[]) does not restore.
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(image), label


def append_line(path: str | Path, line: str) -> None:
    """One line appended with a single ``O_APPEND`` write: lines from several processes (loader
    workers, DDP ranks) never interleave. A line that cannot be written (a full disk) is dropped:
    the warning that goes with it still says what happened."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line.replace("\n", " ") + "\n").encode("utf-8", errors="surrogateescape"))
        finally:
            os.close(fd)


def collate_readable(items: list[tuple[torch.Tensor, int] | None]) -> Any:
    """The batch of the readable samples (``None``: an image left out, see ``LabeledImages``). A batch
    with none left stops the run with one line: a step that never happens would shift the plan's
    learning rates (a function of the global step) against the epochs, and under DDP leave that rank
    out of a gradient synchronisation. The same command with ``ckpt_path=last`` continues."""
    readable = [item for item in items if item is not None]
    if not readable:
        raise ChangedSinceScan(
            f"every image of a training batch ({len(items)}) became unreadable after the data scan: is the disk "
            "or mount failing? Fix it, then the same command with ckpt_path=last continues"
        )
    return default_collate(readable)


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_num_workers() -> int:
    return min(8, available_cores())


CPU_EVAL_BATCH = 4  # see ImageFolderDataModule.eval_batch_size


class ImageFolderDataModule(LightningDataModule):
    """Train / validation / test loaders. Only ``train`` is augmented.

    ``batch_size`` is per device: under DDP each process loads ``batch_size`` images per step.
    ``index`` (the scanned splits, ``data_index.scan_splits``) is held as it is: what the loaders
    read, and what the runner reads back for its reports.
    """

    def __init__(
        self,
        index: SplitIndex,
        image_size: int = 150,
        batch_size: int = 20,
        num_workers: int | None = None,
        augment: str = "seed",
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        pin_memory: bool = False,
        seed: int = 0,
        decoded_cache_dir: str | Path | None = None,
        balanced_sampler: bool = False,
        interpolation: str = "bilinear",
        crop_pct: float = 1.0,
        random_erasing: float = 0.0,
    ):
        super().__init__()
        self.random_erasing = random_erasing  # v2.RandomErasing's probability on training images
        self.interpolation = interpolation  # the backbone's resize filter
        self.crop_pct = crop_pct  # evaluation's centre crop (1: none)
        self.decoded_cache_dir = decoded_cache_dir
        self.balanced_sampler = balanced_sampler
        # Only global rank zero prepares data (downloads): the data root is expected on a shared disk.
        self.prepare_data_per_node = False
        self.seed = seed
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.augment = augment
        self.mean, self.std = tuple(mean), tuple(std)
        self.pin_memory = pin_memory
        self.index = index
        self.datasets: dict[str, LabeledImages] = {}
        self.skip_log: Path | None = None  # where training appends the images it had to skip (the run sets it)

    @property
    def classes(self) -> list[str]:
        return self.index.classes

    def eval_transform(self):
        return eval_transform(self.image_size, self.mean, self.std, self.interpolation, self.crop_pct)

    def prepare_data(self) -> None:
        """With a decoded-image cache: decode the training split once (global rank zero)."""
        if self.decoded_cache_dir is not None:
            decoded_cache(self.index.samples["train"], self.image_size, self.decoded_cache_dir, self.num_workers or 1)

    def _decoded(self, split: str) -> Path | None:
        """The training split's decoded cache. Validation and test are always read from the files,
        so a run's own evaluation sees the pixels stage=test, predict.py and an export's user see
        (the cache holds a larger resize that the crops need: resizing it again would differ)."""
        if self.decoded_cache_dir is None or split != "train":
            return None
        samples = self.index.samples[split]
        return decoded_cache(samples, self.image_size, self.decoded_cache_dir, max(1, self.num_workers))

    def setup(self, stage: str | None = None) -> None:
        cached = self.decoded_cache_dir is not None
        train_tf = train_transform(
            self.augment,
            self.image_size,
            self.mean,
            self.std,
            cached=cached,
            interpolation=self.interpolation,
            random_erasing=self.random_erasing,
        )
        for split, samples in self.index.samples.items():
            transform = train_tf if split == "train" else self.eval_transform()
            train = split == "train"
            self.datasets[split] = LabeledImages(
                samples,
                transform,
                self.image_size,
                self.seed,
                self._decoded(split),
                skip_unreadable=train,
                skip_log=self.skip_log if train else None,
            )

    def eval_dataset(self, split: str) -> LabeledImages:
        """A split with the deterministic transform (also for ``train``): for feature extraction."""
        return LabeledImages(self.index.samples[split], self.eval_transform(), self.image_size)

    def loader(self, dataset: Dataset, train: bool, batch_size: int | None = None) -> DataLoader:
        """A loader over ``dataset``: shuffled and sharded by rank for training, and for evaluation
        sharded without repeats (see ``datamodules.sampling``)."""
        sampler = (
            train_sampler(dataset, self.trainer, self.seed, balanced=self.balanced_sampler)
            if train
            else eval_sampler(dataset, self.trainer)
        )
        kwargs = dict(
            batch_size=batch_size or self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_readable,
            **worker_options(self.num_workers, True, self.trainer.global_rank if self.trainer else None),
        )
        if train and self.trainer is not None:
            trainer = self.trainer
            progress = lambda: trainer.fit_loop.epoch_loop.batch_progress.current.completed  # noqa: E731
            return ResumableLoader(dataset, progress=progress, **kwargs)
        return DataLoader(dataset, **kwargs)

    def eval_batch_size(self) -> int:
        """Evaluation batch: on CPU small batches are faster, as for feature extraction (large
        activations are freed to the OS and page-faulted back every batch; measured in
        ``benchmarks/eval_speed.py``). Frozen BatchNorm makes it batch-independent."""
        on_cpu = self.trainer is None or isinstance(self.trainer.accelerator, CPUAccelerator)
        return min(CPU_EVAL_BATCH, self.batch_size) if on_cpu else self.batch_size

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.datasets["train"], train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.datasets["val"], train=False, batch_size=self.eval_batch_size())

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.datasets["test"], train=False, batch_size=self.eval_batch_size())
