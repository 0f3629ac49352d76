"""Grad-CAM overlays (the ``grad-cam`` package, an optional extra: ``pip install -e ".[cam]"``).

Where the model looked for its prediction: gradients of the predicted class's logit with respect
to the backbone's last spatial feature map. Used for the TensorBoard grid of the
most confident validation errors and by ``predict.py cam_dir=DIR``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn


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


def cam_layer(backbone: nn.Module, image_size: int) -> nn.Module:
    """The last module of the backbone whose output is still a spatial map (H * W > 1): usually
    inside the top block, but a top block that ends by pooling (ConvNeXt's final LayerNorm on a
    1x1 map) or small inputs (a 1x1 map at 32 px) would otherwise give a CAM of one pixel. Found
    by one probing forward pass, remembered on the backbone per input size."""
    found = backbone.__dict__.setdefault("_cam_layers", {})
    if image_size not in found:
        found[image_size] = _probe_cam_layer(backbone, image_size)
    return found[image_size]


def _probe_cam_layer(backbone: nn.Module, image_size: int) -> nn.Module:
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
    spatial = [m for m, shape in seen if len(shape) == 4 and shape[2] * shape[3] > 1]
    return spatial[-1] if spatial else backbone.blocks[-1]


def gradcam(model: nn.Module, images: torch.Tensor, classes: list[int], binary: bool) -> np.ndarray:
    """Grad-CAM maps ``(N, H, W)`` in [0, 1] at the input's size for ``classes`` (one per image)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if binary:  # one logit: the evidence for class 1 is the logit, for class 0 its negative
        targets = [(lambda out, s=(1.0 if c == 1 else -1.0): out[0] * s) for c in classes]
    else:
        targets = [ClassifierOutputTarget(c) for c in classes]
    layer = cam_layer(model.backbone, images.shape[-1])
    was_training = model.training
    model.eval()
    # grad-cam needs autograd, also when called from validation (inference mode)
    with torch.inference_mode(False), torch.enable_grad(), _parameters_frozen(model):
        inputs = images.detach().clone().requires_grad_(True)
        with GradCAM(model=_Logits(model), target_layers=[layer]) as cam:
            maps = cam(input_tensor=inputs, targets=targets)
    model.train(was_training)
    return maps


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)`` with a CAM ``mask`` (any size, resized to the image's) on top."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    height, width = image.shape[:2]
    resized = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR))
    return show_cam_on_image(image.astype(np.float32) / 255.0, resized.astype(np.float32) / 255.0, use_rgb=True)
