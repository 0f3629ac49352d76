"""Grad-CAM on transformers: the patch tokens entering the last block's attention, on their grid.

Before this, the probe for "the last spatial map" took any 4-D output, and in a ViT that was an
attention head's (B, heads, tokens, dim) tensor: a map of noise, drawn without complaint.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm", reason="pip install -e '.[timm]'")
pytest.importorskip("pytorch_grad_cam", reason="pip install -e '.[cam]'")

from lightning_modules.cam import TokensToMap, cam_target, gradcam, nhwc_to_map  # noqa: E402
from lightning_modules.timm_backbones import cut  # noqa: E402
from lightning_modules.timm_vit import TokenTop  # noqa: E402

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}
# (timm.create_model's arguments, patch grid side at img_size, prefix tokens, the expected layer)
TOKENS_IN = lambda net, model: model.backbone.blocks[-2]  # noqa: E731  the tokens entering the last block
TRANSFORMERS = {
    "vit_tiny_patch16_224": ({"img_size": 64, "depth": 2}, 4, 1, TOKENS_IN),  # class token
    "vit_small_patch14_reg4_dinov2": ({**TINY, "img_size": 56}, 4, 5, TOKENS_IN),  # class + 4 registers
    "vit_base_patch16_siglip_224": ({**TINY, "img_size": 64}, 4, 0, TOKENS_IN),  # attention pool
    "vit_small_patch16_18x2_224": ({**TINY, "img_size": 64}, 4, 1, TOKENS_IN),  # parallel blocks
    "vit_base_patch16_xp_224": ({**TINY, "img_size": 64}, 4, 1, TOKENS_IN),  # RmsNorm, qk norm, parallel
    "eva02_enormous_patch14_clip_224": ({**TINY, "img_size": 56}, 4, 1, TOKENS_IN),  # post-norm, class token
    "beit_base_patch16_224": ({**TINY, "img_size": 64}, 4, 1, TOKENS_IN),
    "swin_tiny_patch4_window7_224": (
        {"depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "embed_dim": 24},
        7,
        0,
        lambda net, model: net.layers[-1].blocks[-1].norm1,  # NHWC
    ),
}


class _Backbone(nn.Module):
    def __init__(self, net: nn.Module, name: str):
        super().__init__()
        self.blocks = nn.Sequential(*cut(net, f"timm:{name}"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(images)


class _Chain(nn.Module):
    """The project's blocks of a timm network under a two-class linear head, as a classifier."""

    def __init__(self, net: nn.Module, name: str):
        super().__init__()
        self.backbone = _Backbone(net, name)
        self.head = nn.Linear(getattr(net, "head_hidden_size", None) or net.num_features, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images).flatten(1))


def test_tokens_become_a_map_laid_out_as_timm_numbers_its_patches():
    tokens = torch.arange(2 + 9).float()[None, :, None].expand(1, 11, 3)  # token i holds i
    grid = TokensToMap(prefix=2)(tokens)
    assert grid.shape == (1, 3, 3, 3)
    # patch k (after the prefix) is row k // 3, column k % 3, as PatchEmbed flattens (B, C, H, W)
    assert torch.equal(grid[0, 0], torch.tensor([[2.0, 3, 4], [5, 6, 7], [8, 9, 10]]))
    nhwc = torch.arange(2 * 3 * 4).float().reshape(1, 2, 3, 4)
    assert torch.equal(nhwc_to_map(nhwc)[0, :, 1, 2], nhwc[0, 1, 2])


@pytest.mark.parametrize(
    ("name", "prefix", "cell"), [("vit_tiny_patch16_224", 1, 16), ("swin_tiny_patch4_window7_224", 0, 4)]
)
def test_the_map_puts_each_patch_where_it_is_in_the_image(name, prefix, cell):
    """Change one patch of the image (row 1, column 2): after the patch embedding (a ViT's stem with
    its position embedding; Swin's first unit) only that cell of the map changes."""
    kwargs = TRANSFORMERS[name][0]
    net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    first = _Chain(net, name).backbone.blocks[0]
    size = kwargs.get("img_size", 224)
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    changed = image.clone()
    changed[..., cell : 2 * cell, 2 * cell : 3 * cell] += 1.0
    to_map = TokensToMap(prefix) if prefix else nhwc_to_map
    with torch.no_grad():
        difference = (to_map(first(changed)) - to_map(first(image))).abs().sum(1)[0]
    moved = (difference > 1e-4).nonzero().tolist()
    assert moved == [[1, 2]], moved


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_a_transformer_cam_is_grad_cam_on_its_patch_grid_before_the_last_attention(name):
    """The map equals Grad-CAM worked out by hand on the tokens entering the last transformer block
    (prefix dropped) or Swin's last norm1 (NHWC), on the patch grid: channels weighted by their
    mean gradient, ReLU. Compared per patch cell after grad-cam's resize to the image. A zero map
    (a class token's gradient after the last block) or a layout error fails."""
    kwargs, side, prefix, expected = TRANSFORMERS[name]
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    model = _Chain(net, name).eval()
    size = kwargs.get("img_size", 224)
    target = cam_target(model.backbone, size)
    assert target.layer is expected(net, model)

    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    classes = [0, 1]
    maps = gradcam(model, images, classes, binary=False)
    assert maps.shape == (2, size, size)

    cell = size // side
    for i, c in enumerate(classes):
        by_hand = _grad_cam_by_hand(model, target.layer, images[i : i + 1], c, side, prefix)
        assert by_hand.shape == (side, side) and by_hand.max() > 0 and by_hand.std() > 0
        ours = maps[i][: side * cell, : side * cell].reshape(side, cell, side, cell).mean(axis=(1, 3))
        assert np.corrcoef(ours.ravel(), by_hand.ravel())[0, 1] > 0.9, (ours, by_hand)


def _grad_cam_by_hand(model: nn.Module, layer: nn.Module, image: torch.Tensor, c: int, side: int, prefix: int):
    seen = {}
    hook = layer.register_forward_hook(lambda m, inp, out: seen.update(out=out))
    try:
        logits = model(image)
    finally:
        hook.remove()
    activation = seen["out"]
    (grad,) = torch.autograd.grad(logits[0, c], activation)

    def to_map(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 3:  # (1, prefix + side * side, C) tokens
            assert t.shape[1] == prefix + side * side, t.shape
            t = t[:, prefix:].reshape(1, side, side, -1)
        return t.permute(0, 3, 1, 2)  # (1, side, side, C): Swin's, or the tokens'

    a, g = to_map(activation), to_map(grad)
    return torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1))[0].detach().numpy()


class _OddTokens(nn.Module):
    """A stem whose image becomes 1 + 6 tokens: six patches are no square grid."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :28].reshape(-1, 7, 4)


class _Top(TokenTop):
    """A token network's top unit: the class token, as ``(B, D, 1, 1)``."""

    def __init__(self):
        nn.Module.__init__(self)
        self.net = SimpleNamespace(num_prefix_tokens=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0, :, None, None]


def test_a_cnn_with_attention_blocks_keeps_its_last_spatial_map():
    """MobileNetV4's hybrids have attention modules without norm1: a CNN's map, not a transformer's."""
    net = timm.create_model("mobilenetv4_hybrid_medium", pretrained=False, num_classes=0).eval()
    model = _Chain(net, "mobilenetv4_hybrid_medium").eval()
    target = cam_target(model.backbone, 64)
    assert target.reshape is None
    maps = gradcam(model, torch.randn(2, 3, 64, 64), [0, 1], binary=False)
    assert maps.shape == (2, 64, 64) and maps.max() > 0 and maps.std() > 0


def test_a_token_grid_that_is_not_square_is_refused_in_one_line():
    from core.errors import UserError

    backbone = _Backbone.__new__(_Backbone)
    nn.Module.__init__(backbone)
    backbone.blocks = nn.Sequential(_OddTokens(), nn.Sequential(nn.LayerNorm(4), _Top()))
    with pytest.raises(UserError, match=r"\(1, 7, 4\), are not a square grid of patches after 1 prefix tokens"):
        cam_target(backbone, 8)
