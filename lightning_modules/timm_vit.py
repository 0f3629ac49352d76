"""The cut of timm's token networks (ViT and its variants, BEiT) and of Swin, for ``timm_backbones``.

A ViT's ``forward_features`` is ``patch_embed -> _pos_embed -> patch_drop -> norm_pre -> blocks ->
norm`` and its ``forward_head(x, pre_logits=True)`` pools the tokens (class token, average, or
attention pool, per ``global_pool``), then ``fc_norm`` and ``head_drop``. Rather than re-writing
those steps, the stem and the top unit are *parts* of the network: shallow copies of it that share
some of its modules and parameters and hold nothing of the rest, so timm's own ``forward_features``
(whose blocks and final norm a stem part lacks) and ``forward_head`` run on them unchanged, with
every option of the model (register tokens, no-embed-class, dynamic image size, attention pool).
Swin's stages are a chain of modules over NHWC maps; its top unit is ``norm`` and timm's head.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

Units = list[tuple[str, nn.Module]]

# What a token network applies after its blocks; the rest of its children belong to the stem.
TOKEN_TOP = ("norm", "fc_norm", "attn_pool", "head_drop", "head")


class TopUnit(nn.Module):
    """The unit that ends a network: final norm and pre-logits pooling, returning ``(B, D, 1, 1)``.
    It trains with the block before it (``timm_backbones.cut``), whatever timm's grouping says."""


class PreLogitsMap(TopUnit):
    """A timm head up to its pre-logits features (pooling, norm, MLP; no classifier), after the
    network's final ``norm`` if given, returned as a ``(B, D, 1, 1)`` map so the project's head
    pooling (avg or flatten) passes it through."""

    def __init__(self, head: nn.Module, norm: nn.Module | None = None):
        super().__init__()
        self.norm = norm
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        return self.head(x, pre_logits=True)[:, :, None, None]


def part(net: nn.Module, keep: set[str]) -> nn.Module:
    """A shallow copy of ``net`` that shares its children, parameters and buffers named in ``keep``;
    the other children are empty ``nn.Sequential`` (an identity that also iterates as no blocks),
    the other tensors ``None``. Plain attributes (pooling type, prefix tokens, ...) are shared."""
    piece = copy.copy(net)
    piece._modules = {k: (m if k in keep else nn.Sequential()) for k, m in net._modules.items()}
    piece._parameters = {k: (p if k in keep else None) for k, p in net._parameters.items()}
    piece._buffers = {k: (b if k in keep else None) for k, b in net._buffers.items()}
    piece._non_persistent_buffers_set = set(net._non_persistent_buffers_set) & keep
    return piece


class TokenStem(nn.Module):
    """Patch embedding, class/register tokens, position embedding, ``patch_drop``, ``norm_pre``:
    timm's ``forward_features`` on a part without blocks and final norm."""

    def __init__(self, net: nn.Module):
        super().__init__()
        children = {*net._modules, *net._parameters, *net._buffers}
        self.net = part(net, children - {"blocks", *TOKEN_TOP})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)


class TokenTop(TopUnit):
    """The final norm, then timm's ``forward_head(pre_logits=True)``: the pooled tokens as ``(B, D, 1, 1)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = part(net, set(TOKEN_TOP))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.norm(x), pre_logits=True)[:, :, None, None]


def token_units(net: nn.Module) -> Units:
    """VisionTransformer (ViT, DeiT, CLIP, SigLIP, DINOv2, ...) and BEiT: stem, each block, top."""
    return [("stem", TokenStem(net)), *each("blocks", net.blocks), ("top", TokenTop(net))]


class RopeBlock(nn.Module):
    """An EVA block, given the rotary position embedding that timm's ``forward_features`` computes
    once and hands every block: here recomputed by timm's rope module from the token grid (square
    inputs, as the project's are), so a block stays a function of its input alone."""

    def __init__(self, block: nn.Module, net: nn.Module, index: int):
        super().__init__()
        self.block = block
        self.rope = net.rope  # no parameters; shared by the blocks
        self.prefix = net.num_prefix_tokens
        self.dynamic = net.dynamic_img_size
        self.grid = tuple(net.patch_embed.grid_size)
        self.index = index if getattr(net, "rope_mixed", False) else None  # depth-dependent embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(x.shape[1] - self.prefix)
        # as Eva._pos_embed: RoPE modules without a feat_shape need the grid explicitly
        fixed = not self.dynamic and hasattr(self.rope, "feat_shape")
        rope = (
            self.rope.get_embed() if fixed else self.rope.get_embed(shape=(side, side) if self.dynamic else self.grid)
        )
        return self.block(x, rope=rope if self.index is None else rope[self.index])


def eva_units(net: nn.Module) -> Units:
    """EVA (EVA-02 and its CLIP towers): as a ViT, each block with its rotary position embedding."""
    if net.rope is None:
        return token_units(net)
    blocks = [(f"blocks.{i}", RopeBlock(block, net, i)) for i, block in enumerate(net.blocks)]
    return [("stem", TokenStem(net)), *blocks, ("top", TokenTop(net))]


def swin_units(net: nn.Module) -> Units:
    # patch_embed -> layers (NHWC) -> norm; the head pools the NHWC map
    return [("patch_embed", net.patch_embed), *each("layers", net.layers), ("top", PreLogitsMap(net.head, net.norm))]


def each(prefix: str, container: nn.Module) -> Units:
    return [(f"{prefix}.{name}", module) for name, module in container.named_children()]
