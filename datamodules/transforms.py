"""Image transforms (torchvision transforms v2): augmentation presets and deterministic eval.

Every pipeline squashes the image to ``image_size x image_size`` as the seed's Keras
``flow_from_directory(target_size=(150, 150))`` did, then normalises with the backbone's mean/std;
evaluation with a ``crop_pct`` below 1 (timm's weights' centre crop) squashes to
``image_size / crop_pct`` and keeps the centre ``image_size`` square.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

# torchvision's private helpers, used so that the matrix and sampling grid are exactly RandomAffine's
# (tests/test_transforms.py compares the two wherever torchvision's output is not fill).
from torchvision.transforms.v2.functional._geometry import _affine_grid, _get_inverse_affine_matrix


def _to_normalised(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


class EdgeFillAffine(v2.RandomAffine):
    """``v2.RandomAffine`` (its parameter draws, its nearest-neighbour sampling) with the outside
    filled by the nearest edge pixel, Keras' ``fill_mode='nearest'``.

    torchvision fills only with a constant; emulating the edge fill by padding with edge copies,
    warping the padded canvas and cropping the centre back warps 2.25x the pixels (the seed pipeline's
    main cost on cached images) and is still constant beyond the pad. One ``grid_sample`` with
    ``padding_mode='border'`` over the output does it exactly, with torchvision's own matrix and grid."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        plain_tensor = isinstance(inpt, torch.Tensor) and not isinstance(inpt, tv_tensors.TVTensor)
        if not (plain_tensor or isinstance(inpt, tv_tensors.Image)):
            return super().transform(inpt, params)  # PIL images, boxes, masks: torchvision's own affine
        height, width = inpt.shape[-2:]
        translate = [float(t) for t in params["translate"]]
        matrix = _get_inverse_affine_matrix([0.0, 0.0], params["angle"], translate, params["scale"], params["shear"])
        theta = torch.tensor(matrix, dtype=torch.float32).reshape(1, 2, 3)
        grid = _affine_grid(theta, w=width, h=height, ow=width, oh=height)
        image = inpt.reshape(-1, *inpt.shape[-3:])
        warped = torch.nn.functional.grid_sample(
            image.float(),
            grid.expand(image.shape[0], -1, -1, -1),
            mode="nearest",
            padding_mode="border",
            align_corners=False,
        )
        out = warped.to(inpt.dtype).reshape(inpt.shape)  # nearest: the values are the input's, exactly
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out


def _seed_augmentation() -> list[v2.Transform]:
    """Keras ImageDataGenerator(rotation_range=20, width/height_shift_range=0.1, shear_range=0.1,
    zoom_range=0.1, horizontal_flip=True, fill_mode='nearest')."""
    return [
        # Keras' shear_range is in degrees; its zoom draws x and y scales apart, v2 one scale.
        EdgeFillAffine(degrees=20, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=0.1),
        v2.RandomHorizontalFlip(),
    ]


def _resample(interpolation: str) -> v2.InterpolationMode:
    """The backbone's resize filter (timm weights mostly bicubic; built-ins bilinear)."""
    return v2.InterpolationMode(interpolation)


class RandomDownscale(v2.RandomResize):
    """``v2.RandomResize`` (shorter side to a random ``[min_size, max_size)``) that only ever shrinks:
    a drawn side at or above the input's shorter side leaves it as it is, so a small photo is not
    upscaled (and blurred) on top of the resize that follows."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["size"][0] >= min(v2.functional.get_size(inpt)):
            return inpt
        return super().transform(inpt, params)


def _robust_rescale(size: int, interpolation: str) -> list[v2.Transform]:
    """Half the time the image's shorter side shrinks to between size/4 and size (the resolution of
    small or upscaled photos), then the usual squash-resize back to ``size x size``."""
    resample = _resample(interpolation)
    return [
        v2.RandomApply([RandomDownscale(max(1, size // 4), size + 1, interpolation=resample)], p=0.5),
        v2.Resize((size, size), interpolation=resample, antialias=True),
    ]


def _robust_photometric() -> list[v2.Transform]:
    """Camera and sharing degradations on the ``size x size`` uint8 image, after the seed's geometry.

    Gaussian noise, rotation beyond the seed's 20 degrees and contrast are left out on purpose: the
    shift report measures those shifts too, and a model that was not trained on them shows whether
    its robustness generalises beyond what it was trained on. Every draw here (as in torchvision's
    own transforms) comes from torch's default generator, which ``LabeledImages`` seeds per sample."""
    return [
        v2.ColorJitter(brightness=0.3, saturation=0.3, hue=0.05),
        v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.0))], p=0.3),
        v2.RandomApply([v2.JPEG(quality=(10, 90))], p=0.5),  # last: sharing re-encodes the final image
    ]


# torchvision's automatic augmentation policies, each after a squash-resize and a random flip
# (on uint8 images, as they expect); ``standard`` pairs TrivialAugment with a random resized crop instead
POLICIES = {
    "randaugment": v2.RandAugment,
    "trivialaugment": v2.TrivialAugmentWide,
    "autoaugment": v2.AutoAugment,  # the ImageNet policy
}


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
    size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bilinear", crop_pct: float = 1.0
) -> v2.Compose:
    """Deterministic: squash-resize (with the backbone's filter), to ``size / crop_pct`` and then a
    centre crop of ``size`` when ``crop_pct < 1`` (as timm's eval transform sizes it), scale to
    [0, 1], normalise."""
    scaled = math.floor(size / crop_pct) if crop_pct < 1 else size
    resize = [v2.Resize((scaled, scaled), interpolation=_resample(interpolation), antialias=True)]
    crop = [v2.CenterCrop(size)] if scaled != size else []
    return v2.Compose([v2.ToImage(), *resize, *crop, *_to_normalised(mean, std)])


def backbone_eval_transform(backbone: Any, size: int) -> v2.Compose:
    """:func:`eval_transform` with a backbone's preprocessing (mean, std, filter, crop)."""
    return eval_transform(size, backbone.mean, backbone.std, backbone.interpolation, backbone.crop_pct)


def train_transform(
    preset: str,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    cached: bool = False,
    interpolation: str = "bilinear",
    random_erasing: float = 0.0,
) -> v2.Compose:
    """``none``: as eval; ``seed``: the seed's Keras augmentation; ``standard``: random resized
    crop + flip + TrivialAugmentWide; ``robust``: ``seed`` plus random downscaling, colour jitter,
    blur and JPEG re-encoding (see ``_robust_rescale`` and ``_robust_photometric``);
    ``randaugment``, ``trivialaugment``, ``autoaugment``: squash-resize, flip and torchvision's policy.
    ``random_erasing``: the probability of ``v2.RandomErasing`` on the normalised image, after all else.

    ``cached``: the input is a decoded-cache tensor slightly larger than ``size`` (see
    ``datamodules.decoded_cache``); a random ``size`` crop of it and a random flip replace the
    resize, and ``none`` stays unaugmented apart from them."""
    composed = _train_transform(preset, size, mean, std, cached, interpolation)
    if random_erasing > 0:
        return v2.Compose([*composed.transforms, v2.RandomErasing(p=random_erasing)])
    return composed


def _train_transform(
    preset: str, size: int, mean: Sequence[float], std: Sequence[float], cached: bool, interpolation: str
) -> v2.Compose:
    if preset in POLICIES:
        resize = [v2.Resize((size, size), interpolation=_resample(interpolation), antialias=True)]
        geometry = [v2.RandomCrop(size)] if cached else resize
        policy = POLICIES[preset]()
        return v2.Compose([v2.ToImage(), *geometry, v2.RandomHorizontalFlip(), policy, *_to_normalised(mean, std)])
    if cached:
        flip = [v2.RandomHorizontalFlip()]  # the seed augmentation flips already: not twice
        # robust: the crop is size x size already, so its Resize only restores a downscaled crop
        robust = [*_robust_rescale(size, interpolation), *_seed_augmentation(), *_robust_photometric()]
        extra = {
            "none": flip,
            "seed": _seed_augmentation(),
            "standard": [*flip, v2.TrivialAugmentWide()],
            "robust": robust,
        }[preset]
        return v2.Compose([v2.ToImage(), v2.RandomCrop(size), *extra, *_to_normalised(mean, std)])
    if preset == "none":
        return eval_transform(size, mean, std, interpolation)
    if preset == "seed":
        augment = [v2.Resize((size, size), interpolation=_resample(interpolation), antialias=True)]
        augment += _seed_augmentation()
    elif preset == "robust":
        augment = [*_robust_rescale(size, interpolation), *_seed_augmentation(), *_robust_photometric()]
    else:
        augment = _standard_augmentation(size, interpolation)
    return v2.Compose([v2.ToImage(), *augment, *_to_normalised(mean, std)])
