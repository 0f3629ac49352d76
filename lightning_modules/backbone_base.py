"""What every backbone is, built-in or timm's: its spec, the network cut into blocks, its errors.

Shared by the registry (``lightning_modules.backbones``) and the timm adapter
(``lightning_modules.timm_backbones``), so that neither imports the other's internals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(UserError, RuntimeError):
    """Pretrained weights could not be had; the message is one line telling the user what to do."""


class BackboneError(UserError, ValueError):
    """An unknown or unsupported ``model.backbone``; the message is one line."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[], nn.Module]  # the full network, randomly initialised
    split: Callable[[nn.Module], list[nn.Module]]  # full network -> ordered blocks
    num_blocks: int
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    load_pretrained: Callable[[nn.Module], None] | None = None  # None: torchvision's download
    torchvision_name: str | None = None
    # Bump when ``split`` changes what the blocks compute from the same weights: the feature cache
    # key includes it, so features cached with the old cut are not reused.
    version: int = 1
    # The pretrained weights' preprocessing besides mean/std (timm's pretrained_cfg; None: no opinion).
    default_image_size: int | None = None
    interpolation: str = "bilinear"
    crop_pct: float | None = None
    size_multiple: int = 1  # input sizes must be multiples of this (a ViT's patch size)
    fixed_size: bool = False  # the network takes default_image_size only (e.g. BEiT's position bias)
    # The smallest square input (px) the blocks accept: below it a pooling or an unpadded (or
    # statically padded) convolution has nothing left to work on and torch stops mid-run.
    min_image_size: int = 1


@torch.no_grad()
def smallest_input(net: nn.Module, largest: int = 512) -> int:
    """The smallest square input size ``net`` runs on (a bisection of tiny forwards on zeros;
    sizes above a working one work for every CNN here). ``largest`` if even that fails."""
    was_training = net.training
    net.eval()
    low, high = 0, largest  # low fails (or is 0), high works (or is the cap)
    while high - low > 1:
        middle = (low + high) // 2
        try:
            net(torch.zeros(1, 3, middle, middle))
            high = middle
        except RuntimeError:
            low = middle
    net.train(was_training)
    return high


class Backbone(nn.Module):
    """A network cut into ordered blocks; block ``i`` feeds block ``i + 1``."""

    def __init__(
        self,
        name: str,
        blocks: list[nn.Module],
        mean: Sequence[float],
        std: Sequence[float],
        version: int = 1,
        default_image_size: int | None = None,
        interpolation: str = "bilinear",
        crop_pct: float = 1.0,
    ) -> None:
        super().__init__()
        self.name = name
        self.version = version
        self.blocks = nn.ModuleList(blocks)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.default_image_size = default_image_size
        self.interpolation = interpolation
        self.crop_pct = crop_pct  # evaluation's centre crop: resize to size / crop_pct, keep the centre
        # model.grad_checkpointing: recompute each block's activations in the backward pass instead
        # of keeping them (timm's set_grad_checkpointing runs over its own blocks, which the cut replaces)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled() and _needs_grad(block, x):
                x = checkpoint(block, x, use_reentrant=False)  # dropout's RNG state is replayed
            else:
                x = block(x)
        return x

    @torch.no_grad()
    def output_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, H, W) of the feature map for square inputs of ``image_size``; runs one tiny forward."""
        was_training = self.training
        self.eval()
        shape = self(torch.zeros(1, 3, image_size, image_size)).shape[1:]
        self.train(was_training)
        return tuple(shape)


def _needs_grad(block: nn.Module, x: torch.Tensor) -> bool:
    """A frozen block on an input without gradient keeps no activations: nothing to save by recomputing."""
    return x.requires_grad or any(p.requires_grad for p in block.parameters())


def randomise_norms(net: nn.Module, seed: int) -> None:
    """Random norm weights, biases, running statistics and layer scales: fresh ones are near
    identities, which would hide a dropped or misplaced norm from a check of a cut."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in net.named_parameters():
            if param.ndim == 1 or key.endswith(("gamma", "layer_scale")):
                if key.endswith("bias"):
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
                else:
                    param.copy_(0.5 + torch.rand(param.shape, generator=generator))
        for key, buffer in net.named_buffers():
            if key.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
            elif key.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
