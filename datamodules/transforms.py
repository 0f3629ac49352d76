"""Image transforms (torchvision transforms v2): augmentation presets and deterministic eval.

Every pipeline squashes the image to ``image_size x image_size`` as the seed's Keras
``flow_from_directory(target_size=(150, 150))`` did, then normalises with the backbone's mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

AUGMENT_PRESETS = ("none", "seed", "standard")


def _to_normalised(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def _seed_augmentation(size: int) -> list[v2.Transform]:
    """Keras ImageDataGenerator(rotation_range=20, width/height_shift_range=0.1, shear_range=0.1,
    zoom_range=0.1, horizontal_flip=True, fill_mode='nearest').

    torchvision's affine transforms only fill with a constant, so 'nearest' fill is emulated by
    padding with edge replication first and cropping the centre back afterwards.
    """
    pad = size // 4
    return [
        v2.Pad(pad, padding_mode="edge"),
        # Keras' shear_range is in degrees; its zoom draws x and y scales apart, v2 one scale.
        v2.RandomAffine(degrees=20, translate=(0.1 * size / (size + 2 * pad),) * 2, scale=(0.9, 1.1), shear=0.1),
        v2.CenterCrop(size),
        v2.RandomHorizontalFlip(),
    ]


def _resample(interpolation: str) -> v2.InterpolationMode:
    """The backbone's resize filter (timm weights mostly bicubic; built-ins bilinear)."""
    return v2.InterpolationMode(interpolation)


def _standard_augmentation(size: int, interpolation: str = "bilinear") -> list[v2.Transform]:
    return [
        v2.RandomResizedCrop(size, scale=(0.35, 1.0), interpolation=_resample(interpolation), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.TrivialAugmentWide(),
    ]


# Bump when eval_transform/load_rgb change what pixels the model sees: the feature cache key
# includes it, so features cached from the old pixels are not reused.
PREPROCESSING_VERSION = 1


def eval_transform(
    size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bilinear"
) -> v2.Compose:
    """Deterministic: squash-resize (with the backbone's filter), scale to [0, 1], normalise."""
    resize = v2.Resize((size, size), interpolation=_resample(interpolation), antialias=True)
    return v2.Compose([v2.ToImage(), resize, *_to_normalised(mean, std)])


def train_transform(
    preset: str,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    cached: bool = False,
    interpolation: str = "bilinear",
) -> v2.Compose:
    """``none``: as eval; ``seed``: the seed's Keras augmentation; ``standard``: random resized
    crop + flip + TrivialAugmentWide.

    ``cached``: the input is a decoded-cache tensor slightly larger than ``size`` (see
    ``datamodules.decoded_cache``); a random ``size`` crop of it and a random flip replace the
    resize, and ``none`` stays unaugmented apart from them."""
    if preset not in AUGMENT_PRESETS:
        raise ValueError(f"unknown data.augment {preset!r}; choose one of: {', '.join(AUGMENT_PRESETS)}")
    if cached:
        crop = [v2.RandomCrop(size), v2.RandomHorizontalFlip()]
        extra = {"none": [], "seed": _seed_augmentation(size), "standard": [v2.TrivialAugmentWide()]}[preset]
        return v2.Compose([v2.ToImage(), *crop, *extra, *_to_normalised(mean, std)])
    if preset == "none":
        return eval_transform(size, mean, std, interpolation)
    if preset == "seed":
        augment = [v2.Resize((size, size), interpolation=_resample(interpolation), antialias=True)]
        augment += _seed_augmentation(size)
    else:
        augment = _standard_augmentation(size, interpolation)
    return v2.Compose([v2.ToImage(), *augment, *_to_normalised(mean, std)])
