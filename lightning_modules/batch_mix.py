"""MixUp and CutMix on a training batch (torchvision.transforms.v2), for ``data.mix``.

Their draws (the mixing weight, the box, the pairing) come from torch's default generator, which
``run_safety.StepSeed`` re-seeds from (seed, global step, rank) before every step: a resumed run
mixes every batch as the uninterrupted one did."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from datamodules.choices import MIX_MODES

MIXES = {"mixup": v2.MixUp, "cutmix": v2.CutMix}  # alpha 1: the mixing weight is uniform on [0, 1]


def batch_mix(mode: str, num_classes: int) -> v2.Transform | None:
    """The batch transform of ``data.mix`` (None for ``none``): ``(images, labels)`` to mixed images
    and soft labels ``(B, num_classes)``."""
    if mode not in MIX_MODES:
        raise ValueError(f"data.mix={mode!r}: choose one of {', '.join(MIX_MODES)}")
    return MIXES[mode](num_classes=num_classes) if mode in MIXES else None


def mix_batch(mix: v2.Transform, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed images and soft labels; a batch of one image stays as it is (nothing to mix it with)."""
    if images.shape[0] < 2:
        return images, torch.nn.functional.one_hot(labels, mix.num_classes).float()
    return mix(images, labels)
