"""Split discovery and the image LightningDataModule for ``root/{train,validation,test}/<class>/``
(or ``root/<class>/``, split by ``datamodules.flat_folder``)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.decoded_cache import decoded_cache, open_decoded
from datamodules.image_io import IMAGE_EXTENSIONS, bad_reasons, load_rgb, scan_files
from datamodules.near_duplicates import HASH_NAME, MAX_DISTANCE, NearDuplicate, cross_split_pairs, evaluation_drops
from datamodules.sampling import ResumableLoader, eval_sampler, sample_seed, train_sampler
from datamodules.transforms import eval_transform, train_transform
from lightning_modules.errors import UserError

if TYPE_CHECKING:  # flat_folder imports this module
    from datamodules.flat_folder import Listing, SplitSpec

# Our split name -> folder name (the seed's layout).
SPLIT_DIRS = {"train": "train", "val": "validation", "test": "test"}
LAYOUT = (
    "expected layout: ROOT/{train,validation,test}/<class_name>/<image files>, "
    "or ROOT/<class_name>/<image files> (split automatically by data.split_sizes)"
)


class DataLayoutError(UserError, ValueError):
    """The data folder does not have the expected layout; the message is one line."""


@dataclass(frozen=True)
class SplitIndex:
    """Class names and the ``(path, label)`` samples of each split, sorted for determinism;
    ``skipped`` lists the unreadable files left out of each split, with the reason;
    ``near_duplicates`` the pictures that have a near duplicate in an earlier split (see
    ``datamodules.near_duplicates``), and ``dropped`` those removed from validation and test."""

    root: Path
    classes: list[str]
    samples: dict[str, list[tuple[str, int]]]
    skipped: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    near_duplicates: list[NearDuplicate] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    near_duplicate_distance: int = MAX_DISTANCE
    folds: dict[str, int] = field(default_factory=dict)  # path -> fold of training/validation (data.folds)
    manifest: Path | None = None  # the split manifest the samples were read from (flat folders)
    source: str = "folders"  # folders, flat (split automatically) or manifest (ROOT/manifest.csv)

    def counts(self) -> dict[str, int]:
        return {split: len(s) for split, s in self.samples.items()}

    def near_duplicate_summary(self) -> dict[str, int | str]:
        """The near-duplicate check in numbers (for metrics.json)."""
        return {
            "pairs": len(self.near_duplicates),
            "dropped": sum(len(files) for files in self.dropped.values()),
            "max_distance": self.near_duplicate_distance,
            "hash": HASH_NAME,
        }


def _not_an_image(name: str) -> str | None:
    """Why a file name is not taken as an image (None: it is one)."""
    if name.startswith("."):
        return "hidden file"
    if not name.lower().endswith(IMAGE_EXTENSIONS):
        return "not an image file name (extension)"
    return None


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def root_dirs(root: Path) -> list[str]:
    """Folders directly under the data root, except split folders and those starting with ``.``
    or ``_`` (the download keeps its archive in ``_download/``)."""
    ignored = set(SPLIT_DIRS.values())
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name[0] not in "._" and e.name not in ignored)


def _has_images(folder: Path) -> bool:
    return any(e.is_file() and not _not_an_image(e.name) for e in os.scandir(folder))


def data_layout(root: str | Path, splits: Sequence[str] = ("train", "val", "test")) -> str:
    """``folders`` (ROOT/{train,validation,test}/<class>/), ``flat`` (ROOT/<class>/ or a
    ROOT/manifest.csv: split automatically) or ``none`` (nothing there yet: a download may make
    it). A mix of the two, or split folders without all of ``splits``, is a DataLayoutError."""
    root = Path(root)
    if not root.is_dir():
        return "none"
    present = [split for split, folder in SPLIT_DIRS.items() if (root / folder).is_dir()]
    class_folders = [name for name in root_dirs(root) if _has_images(root / name)]
    if present and class_folders:
        raise DataLayoutError(
            f"data.root={root} mixes split folders ({', '.join(SPLIT_DIRS[s] + '/' for s in present)}) with class "
            f"folders of images ({', '.join(class_folders[:3])}); {LAYOUT} (folders starting with _ are ignored)"
        )
    if present:
        missing = [SPLIT_DIRS[split] for split in splits if split not in present]
        if missing:
            raise DataLayoutError(f"missing split folder {root / missing[0]}; {LAYOUT}")
        return "folders"
    return "flat" if class_folders or (root / "manifest.csv").is_file() else "none"


def _folder_listing(root: Path, splits: Sequence[str]) -> Listing:
    """The samples of ROOT/{train,validation,test}/<class>/ (classes must agree across splits)."""
    from datamodules.flat_folder import Listing

    classes_by_split: dict[str, list[str]] = {}
    for split in splits:
        split_dir = root / SPLIT_DIRS[split]
        classes_by_split[split] = _class_dirs(split_dir)
        if not classes_by_split[split]:
            raise DataLayoutError(f"no class folders in {split_dir}; {LAYOUT}")
    reference_split = splits[0]
    classes = classes_by_split[reference_split]
    for split, names in classes_by_split.items():
        if names != classes:
            raise DataLayoutError(
                f"classes differ between splits: {SPLIT_DIRS[reference_split]}/ has {classes}, "
                f"{SPLIT_DIRS[split]}/ has {names} (under {root})"
            )
    if len(classes) < 2:
        raise DataLayoutError(f"need at least two class folders, found {classes} under {root}")
    samples: dict[str, list[tuple[str, int]]] = {}
    bad: dict[str, str] = {}  # path -> why it is left out
    split_of: dict[str, str] = {}
    for split in splits:
        items = []
        for label, name in enumerate(classes):
            class_dir = root / SPLIT_DIRS[split] / name
            prefix = str(class_dir) + os.sep  # string joins: a Path per file costs more than the stat
            names = sorted(e.name for e in os.scandir(class_dir) if e.is_file())
            for f in names:
                if reason := _not_an_image(f):
                    bad[prefix + f] = reason
                    split_of[prefix + f] = split
            files = [f for f in names if not _not_an_image(f)]
            if not files:
                raise DataLayoutError(f"class folder {class_dir} has no image files; {LAYOUT}")
            items += [(prefix + f, label) for f in files]
        samples[split] = items
    return Listing(classes, samples, bad, split_of)


def scan_splits(
    root: str | Path,
    splits: Sequence[str] = ("train", "val", "test"),
    check_files: bool = True,
    skip_bad_files: bool = True,
    threads: int = 4,
    cache_dir: str | Path | None = None,
    drop_near_duplicates: bool = False,
    near_duplicate_distance: int = MAX_DISTANCE,
    split: SplitSpec | None = None,
) -> SplitIndex:
    """List the images of each split, from ROOT/{train,validation,test}/<class>/ or, for a root
    of class folders, from its split manifest (see ``datamodules.flat_folder``, ``split``: the
    sizes, seed and folds); ``split.folds`` re-divides training and validation into folds.

    With ``check_files`` every image is decoded once: unreadable ones are left out and listed in
    ``SplitIndex.skipped`` (or, with ``skip_bad_files=False``, raise a DataLayoutError), and the
    pictures with a near duplicate in an earlier split are listed in ``SplitIndex.near_duplicates``
    (``drop_near_duplicates``: and removed from validation and test; training is never changed).
    With ``cache_dir`` the checks are remembered there, so unchanged files are not decoded again
    (and a flat folder's split is kept there)."""
    from datamodules.flat_folder import SplitSpec, apply_folds, flat_listing

    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"data.root={root} does not exist; {LAYOUT}")
    spec = split or SplitSpec()
    memory = scan_memory_path(cache_dir, root) if cache_dir is not None else None

    def scan(paths: list[str]) -> dict:
        return scan_files(paths, threads, memory) if check_files else {}

    layout = data_layout(root, splits)
    if layout == "none":
        raise DataLayoutError(f"no split folders and no class folders of images under {root}; {LAYOUT}")
    if layout == "folders":
        listing = _folder_listing(root, splits)
    else:
        listing = flat_listing(root, splits, spec, cache_dir, scan, check_files)
    listing = apply_folds(listing, spec)
    classes, samples, bad = listing.classes, listing.samples, dict(listing.bad)
    hashes: dict[str, int] = {}
    if check_files:  # one scan per call: the scan memory keeps the files of its last call only
        checks = listing.checks if listing.checks is not None else scan([p for s in samples.values() for p, _ in s])
        bad |= bad_reasons(checks)
        hashes = {path: check.dhash for path, check in checks.items() if check.dhash is not None}
    strict_bad = {p: r for p, r in bad.items() if r != "hidden file"}  # OS litter is never an error
    if strict_bad and not skip_bad_files:
        first = "; ".join(f"{path} ({reason})" for path, reason in list(strict_bad.items())[:3])
        raise DataLayoutError(f"{len(strict_bad)} bad file(s), e.g. {first} (data.skip_bad_files=false)")
    pairs = cross_split_pairs(
        {split: [(p, hashes[p]) for p, _ in samples[split] if p in hashes] for split in splits}, near_duplicate_distance
    )
    dropped = evaluation_drops(pairs) if drop_near_duplicates else {}
    split_of = listing.split_of | {path: split for split, items in samples.items() for path, _ in items}
    skipped: dict[str, list[tuple[str, str]]] = {s: [] for s in (*splits, *sorted(set(listing.split_of.values())))}
    for path, reason in bad.items():
        if split_of.get(path) in skipped:
            skipped[split_of[path]].append((path, reason))
    skipped = {s: sorted(items) for s, items in skipped.items() if items or s in splits}
    for split in splits:
        if check_files:
            gone = dropped.get(split, set())
            samples[split] = [(path, label) for path, label in samples[split] if path not in bad and path not in gone]
            missing = set(range(len(classes))) - {label for _, label in samples[split]}
            if missing:
                names = [classes[i] for i in sorted(missing)]
                why = " left after dropping near duplicates (data.drop_near_duplicates=true)" if gone else ""
                raise DataLayoutError(f"no readable images for class(es) {names} in {listing.where(root, split)}{why}")
    dropped_lists = {split: sorted(files) for split, files in dropped.items()}
    folds = listing.fold_of if spec.folds else {}
    return SplitIndex(
        root,
        classes,
        samples,
        skipped,
        pairs,
        dropped_lists,
        near_duplicate_distance,
        folds,
        listing.manifest,
        listing.source,
    )


def scan_memory_path(cache_dir: str | Path, root: Path) -> Path:
    """The remembered decode checks of one data root (see ``image_io.scan_files``)."""
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"scan-{digest}.json"


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
    ):
        self.samples = samples
        self.transform = transform
        self.min_size = min_size
        self.seed = seed
        self.decoded = decoded  # a decoded-image cache file: read from it instead of decoding
        self._array = None

    def _image(self, index: int):
        if self.decoded is None:
            return load_rgb(self.samples[index][0], self.min_size)
        if self._array is None:  # opened lazily, once per loader worker
            self._array = open_decoded(self.decoded)
        return torch.from_numpy(np.array(self._array[index])).permute(2, 0, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        label = self.samples[index][1]
        image = self._image(index)
        if epoch is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(image), label


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
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 150,
        batch_size: int = 20,
        num_workers: int | None = None,
        augment: str = "seed",
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        pin_memory: bool = False,
        index: SplitIndex | None = None,
        seed: int = 0,
        decoded_cache_dir: str | Path | None = None,
        balanced_sampler: bool = False,
        interpolation: str = "bilinear",
    ):
        super().__init__()
        self.interpolation = interpolation  # the backbone's resize filter
        self.decoded_cache_dir = decoded_cache_dir
        self.balanced_sampler = balanced_sampler
        # Only global rank zero prepares data (downloads): the data root is expected on a shared disk.
        self.prepare_data_per_node = False
        self.seed = seed
        self.root = Path(root)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.augment = augment
        self.mean, self.std = tuple(mean), tuple(std)
        self.pin_memory = pin_memory
        self.index = index
        self.datasets: dict[str, LabeledImages] = {}

    @property
    def classes(self) -> list[str]:
        return self._index().classes

    def _index(self) -> SplitIndex:
        if self.index is None:
            self.index = scan_splits(self.root)
        return self.index

    def eval_transform(self):
        return eval_transform(self.image_size, self.mean, self.std, self.interpolation)

    def prepare_data(self) -> None:
        """With a decoded-image cache: decode the training split once (global rank zero)."""
        if self.decoded_cache_dir is not None:
            decoded_cache(
                self._index().samples["train"], self.image_size, self.decoded_cache_dir, self.num_workers or 1
            )

    def _decoded(self, split: str) -> Path | None:
        """The training split's decoded cache. Validation and test are always read from the files,
        so a run's own evaluation sees the pixels stage=test, predict.py and an export's user see
        (the cache holds a larger resize that the crops need: resizing it again would differ)."""
        if self.decoded_cache_dir is None or split != "train":
            return None
        samples = self._index().samples[split]
        return decoded_cache(samples, self.image_size, self.decoded_cache_dir, max(1, self.num_workers))

    def setup(self, stage: str | None = None) -> None:
        index = self._index()
        cached = self.decoded_cache_dir is not None
        train_tf = train_transform(
            self.augment, self.image_size, self.mean, self.std, cached=cached, interpolation=self.interpolation
        )
        for split, samples in index.samples.items():
            transform = train_tf if split == "train" else self.eval_transform()
            self.datasets[split] = LabeledImages(samples, transform, self.image_size, self.seed, self._decoded(split))

    def eval_dataset(self, split: str) -> LabeledImages:
        """A split with the deterministic transform (also for ``train``): for feature extraction."""
        return LabeledImages(self._index().samples[split], self.eval_transform(), self.image_size)

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
        )
        if train and self.trainer is not None:
            trainer = self.trainer
            progress = lambda: trainer.fit_loop.epoch_loop.batch_progress.current.completed  # noqa: E731
            return ResumableLoader(dataset, progress=progress, **kwargs)
        return DataLoader(dataset, **kwargs)

    def eval_batch_size(self) -> int:
        """Evaluation batch: on CPU small batches are faster, as for feature extraction (large
        activations are freed to the OS and page-faulted back every batch; Lite0 at 224 px on 2
        cores: 38.7 img/s at batch 32, 74.6 at 4). Frozen BatchNorm makes it batch-independent."""
        from lightning.pytorch.accelerators import CPUAccelerator

        on_cpu = self.trainer is None or isinstance(self.trainer.accelerator, CPUAccelerator)
        return min(CPU_EVAL_BATCH, self.batch_size) if on_cpu else self.batch_size

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.datasets["train"], train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.datasets["val"], train=False, batch_size=self.eval_batch_size())

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.datasets["test"], train=False, batch_size=self.eval_batch_size())
