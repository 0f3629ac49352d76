"""Grad-CAM overlays (the ``grad-cam`` package, an optional extra: ``pip install -e ".[cam]"``).

Where the model looked for its prediction: gradients of the predicted class's logit with respect
to the backbone's last spatial feature map (a transformer's: the patch tokens entering its last
block, on their grid). Used for the TensorBoard grid of the most confident validation
errors and by ``predict.py cam_dir=DIR``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from core.errors import UserError
from lightning_modules.timm_vit import TokenTop


def cam_available() -> bool:
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        return False
    return True


class _Logits(nn.Module):
    """images -> logits of the wrapped classifier; ``zero_grad`` is a no-op because the wrapped
    model may be in the middle of training (grad-cam calls it before every backward pass)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).float()

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


@contextlib.contextmanager
def _parameters_frozen(model: nn.Module) -> Iterator[None]:
    """No parameter collects gradients during the CAM's backward pass (only the input does)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass(frozen=True)
class CamTarget:
    """The layer Grad-CAM weighs and how its output becomes a ``(B, C, H, W)`` map (None: it is one)."""

    layer: nn.Module
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None


class TokensToMap:
    """``(B, prefix + H * W, C)`` tokens -> ``(B, C, H, W)``: the class and register tokens dropped,
    the patch tokens laid out on their (square) grid, as grad-cam's ViT recipe does."""

    def __init__(self, prefix: int):
        self.prefix = prefix

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.prefix :]
        side = math.isqrt(patches.shape[1])
        return patches.reshape(patches.shape[0], side, side, patches.shape[2]).permute(0, 3, 1, 2)


def nhwc_to_map(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def cam_target(backbone: nn.Module, image_size: int) -> CamTarget:
    """Where Grad-CAM looks, found by one probing forward pass and remembered on the backbone per
    input size. A token network (ViT and its variants, EVA, BEiT): the tokens entering its last
    transformer block, on their patch grid (after that block a class token no longer reads the patch
    tokens, so their gradient there is zero; taken between the project's blocks, this holds whatever
    the block's norms and layout). Swin: its last block's ``norm1`` (NHWC). Any other network: the
    last module whose output is still a spatial map (H * W > 1)."""
    found = backbone.__dict__.setdefault("_cam_targets", {})
    if image_size not in found:
        found[image_size] = _probe_cam_target(backbone, image_size)
    return found[image_size]


def _probe_cam_target(backbone: nn.Module, image_size: int) -> CamTarget:
    shapes = _output_shapes(backbone, image_size)
    top = next((m for m in backbone.blocks[-1].modules() if isinstance(m, TokenTop)), None)
    if top is not None:
        layer = backbone.blocks[-2]
        shape = next(shape for m, shape in shapes if m is layer)
        prefix = top.net.num_prefix_tokens
        patches = shape[1] - prefix if len(shape) == 3 else -1
        if patches > 0 and math.isqrt(patches) ** 2 == patches:
            return CamTarget(layer, TokensToMap(prefix))
        raise UserError(
            f"Grad-CAM: the tokens entering the last transformer block, {tuple(shape)}, are not a square grid"
            f" of patches after {prefix} prefix tokens"
        )
    # Swin's blocks: attention over windows of an NHWC map, norm1 first
    for block in reversed(list(backbone.blocks.modules())):
        norm = getattr(block, "norm1", None)
        if hasattr(block, "attn") and isinstance(norm, nn.LayerNorm):
            shape = next((shape for m, shape in shapes if m is norm), ())
            if len(shape) == 4 and shape[-1] == norm.normalized_shape[-1] and shape[1] * shape[2] > 1:
                return CamTarget(norm, nhwc_to_map)
            break
    spatial = [m for m, shape in shapes if len(shape) == 4 and shape[2] * shape[3] > 1]
    # a top block that ends by pooling (ConvNeXt's head on a 1x1 map) or small inputs (1x1 at 32 px)
    # would otherwise give a CAM of one pixel
    return CamTarget(spatial[-1] if spatial else backbone.blocks[-1])


def _output_shapes(backbone: nn.Module, image_size: int) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """Every module under the backbone's blocks with its output's shape, in the order they ran."""
    seen: list[tuple[nn.Module, tuple[int, ...]]] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: seen.append((m, tuple(o.shape))))
        for m in backbone.blocks.modules()
        if m is not backbone.blocks
    ]
    try:
        with torch.no_grad():
            was_training = backbone.training
            backbone.eval()
            backbone(torch.zeros(1, 3, image_size, image_size, device=next(backbone.parameters()).device))
            backbone.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def gradcam(model: nn.Module, images: torch.Tensor, classes: list[int], binary: bool) -> np.ndarray:
    """Grad-CAM maps ``(N, H, W)`` in [0, 1] at the input's size for ``classes`` (one per image)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if binary:  # one logit: the evidence for class 1 is the logit, for class 0 its negative
        targets = [(lambda out, s=(1.0 if c == 1 else -1.0): out[0] * s) for c in classes]
    else:
        targets = [ClassifierOutputTarget(c) for c in classes]
    target = cam_target(model.backbone, images.shape[-1])
    was_training = model.training
    model.eval()
    # grad-cam needs autograd, also when called from validation (inference mode)
    with torch.inference_mode(False), torch.enable_grad(), _parameters_frozen(model):
        inputs = images.detach().clone().requires_grad_(True)
        with GradCAM(model=_Logits(model), target_layers=[target.layer], reshape_transform=target.reshape) as cam:
            maps = cam(input_tensor=inputs, targets=targets)
    model.train(was_training)
    return maps


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)`` with a CAM ``mask`` (any size, resized to the image's) on top."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    height, width = image.shape[:2]
    resized = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR))
    return show_cam_on_image(image.astype(np.float32) / 255.0, resized.astype(np.float32) / 255.0, use_rgb=True)
