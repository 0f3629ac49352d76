"""Stage ``features``: run the frozen backbone once per image, cache the pooled features on disk.

The cache file is named by a key over everything that determines the features: backbone name, the
version of its cut and a hash of its weights, the versions of the decoding and preprocessing code,
image size, normalisation, pooling and the list of files (path, size, modification time). Any
change gives a new key, so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, TensorDataset

from core.atomic_io import file_lock, torch_save_atomic
from core.progress import Progress
from datamodules import image_io, transforms
from datamodules.image_folder import CPU_EVAL_BATCH, ImageFolderDataModule
from datamodules.layout import stat_scanned
from datamodules.sampling import eval_sampler, train_sampler
from datamodules.workers import worker_options
from lightning_modules.backbones import weights_fingerprint
from lightning_modules.choices import file_safe
from lightning_modules.timm_backbones import TIMM_PREFIX


def _timm_version(backbone: str) -> str | None:
    """timm's version for a timm backbone: a new release may compute other features."""
    if not backbone.startswith(TIMM_PREFIX):
        return None
    import timm

    return timm.__version__


def cache_key(images: ImageFolderDataModule, model: torch.nn.Module, pool: str, views: int = 1) -> str:
    """A short hash of everything that determines the cached features (see the module docstring)."""
    index = images.index
    files = []
    for split, samples in sorted(index.samples.items()):
        for path, label in samples:
            stat = stat_scanned(path)
            files.append((split, os.path.relpath(path, index.root), label, stat.st_size, stat.st_mtime_ns))
    description = {
        "backbone": model.backbone.name,
        # code versions: the same weights and files give other features after these change
        "backbone_version": model.backbone.version,
        "preprocessing_version": transforms.PREPROCESSING_VERSION,
        "decode_version": image_io.DECODE_VERSION,  # load_rgb's own (the decoded-image cache's key has it)
        "weights": weights_fingerprint(model.backbone),
        "image_size": images.image_size,
        "mean": images.mean,
        "std": images.std,
        "interpolation": images.interpolation,
        "crop_pct": images.crop_pct,
        "timm": _timm_version(model.backbone.name),
        "pool": pool,
        "views": views,
        "classes": index.classes,
        "files": files,
    }
    return hashlib.sha256(json.dumps(description).encode()).hexdigest()[:20]


@torch.no_grad()
def extract_features(
    model, loader: DataLoader, device: torch.device, views: int = 1, desc: str = "features"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled backbone features ``(N, views, D)`` in loader order, on the CPU; view 1 is the
    horizontally mirrored image. Progress (images/s, time left) as ``desc`` (``core.progress``)."""
    was_training = model.training
    # channels_last: faster convolutions on CPU.
    model.eval().to(device, memory_format=torch.channels_last)
    features, labels = [], []
    progress = Progress(len(loader.dataset), desc)
    for images, target in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        batch = [model.forward_features(images)]
        if views == 2:
            batch.append(model.forward_features(images.flip(-1)))
        features.append(torch.stack(batch, dim=1).float().cpu())
        labels.append(target)
        progress.update(len(target))
    progress.close()
    model.to(memory_format=torch.contiguous_format).train(was_training)
    return torch.cat(features), torch.cat(labels)


def extraction_batch_size(device: torch.device, batch_size: int) -> int:
    # On CPU, small batches are faster: large activations are freed to the OS (munmap) and
    # page-faulted back every batch; the same rule as evaluation's (ImageFolderDataModule.eval_batch_size).
    return min(CPU_EVAL_BATCH, batch_size) if device.type == "cpu" else max(64, batch_size)


class FeatureDataModule(LightningDataModule):
    """Loaders over cached features; ``prepare_data`` (one process per node) builds the cache."""

    def __init__(
        self,
        images: ImageFolderDataModule,
        model: torch.nn.Module,
        cache_dir: str | Path,
        pool: str,
        device: torch.device | str = "cpu",
        flip_train: bool = False,
        flip_eval: bool = False,
    ):
        super().__init__()
        # Global rank zero writes the cache (on a disk all nodes share); every rank then reads it.
        self.prepare_data_per_node = False
        self.images = images
        self.model = model
        self.cache_dir = Path(cache_dir)
        self.pool = pool
        self.device = torch.device(device)
        # Mirrored images: extra training samples (the one augmentation cached features allow)
        # and/or a second view averaged at evaluation (test-time flip).
        self.flip_train, self.flip_eval = flip_train, flip_eval
        self.views = 2 if flip_train or flip_eval else 1
        self.computed = False  # whether this instance (re)built the cache
        self._path: Path | None = None
        self.datasets: dict[str, TensorDataset] = {}

    @property
    def path(self) -> Path:
        if self._path is None:
            key = cache_key(self.images, self.model, self.pool, self.views)
            self._path = self.cache_dir / f"{file_safe(self.model.backbone.name)}-{self.images.image_size}px-{key}.pt"
        return self._path

    def prepare_data(self) -> None:
        if self.path.is_file():
            rank_zero_info(f"feature cache hit: {self.path}")
            return
        # another run on the same cache_dir may be building this file: wait for it, then read it
        with file_lock(self.path):
            if self.path.is_file():
                rank_zero_info(f"feature cache hit: {self.path} (built by another process)")
                return
            self._build()
        self.computed = True

    def _build(self) -> None:
        rank_zero_info(f"building feature cache {self.path}")
        splits = {}
        for split in self.images.index.samples:
            batch = extraction_batch_size(self.device, self.images.batch_size)
            # one process extracts everything: a plain sequential loader, not the rank-sharded one
            loader = DataLoader(
                self.images.eval_dataset(split),
                batch_size=batch,
                num_workers=self.images.num_workers,
                **worker_options(self.images.num_workers),
            )
            started = time.time()
            splits[split] = extract_features(self.model, loader, self.device, self.views, f"features ({split})")
            rank_zero_info(f"feature cache: {split} ({len(splits[split][1])} images) in {time.time() - started:.1f}s")
        # atomic: a crash never leaves a truncated cache behind, a full disk is one DiskFullError line
        torch_save_atomic({split: {"x": x, "y": y} for split, (x, y) in splits.items()}, self.path)

    def setup(self, stage: str | None = None) -> None:
        data = torch.load(self.path, map_location="cpu", weights_only=True)
        self.datasets = {}
        for split, d in data.items():
            x, y = d["x"], d["y"]  # x: (N, views, D)
            if split == "train":
                views = x.shape[1] if self.flip_train else 1
                self.datasets[split] = TensorDataset(x[:, :views].flatten(0, 1), y.repeat_interleave(views))
            else:
                self.datasets[split] = TensorDataset(x if self.flip_eval else x[:, 0], y)

    def _loader(self, split: str, train: bool) -> DataLoader:
        # Features are already tensors in memory: worker processes would only add overhead.
        dataset = self.datasets[split]
        sampler = (
            train_sampler(
                dataset, self.trainer, self.images.seed, with_epoch=False, balanced=self.images.balanced_sampler
            )
            if train
            else eval_sampler(dataset, self.trainer)
        )
        return DataLoader(dataset, batch_size=self.images.batch_size, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
