"""``model.backbone=timm:<name>``: a timm network cut into ordered blocks, like the built-in backbones.

The blocks run in sequence (``Backbone.forward``) and the head average-pools their output, so they
must compute exactly what timm computes up to its pre-logits features,
``net.forward_head(net.forward_features(x), pre_logits=True)``. Each supported family lists its
chain below (read off timm's ``forward_features`` / ``forward_head``): CNNs are a plain chain of
modules over ``(B, C, H, W)`` maps; token networks (ViT and its variants, BEiT) and Swin are cut in
``lightning_modules.timm_vit``. Where timm does more than average pooling after
``forward_features`` (ConvNeXt's final LayerNorm, MobileNetV3's pooled head conv, a ViT's final
norm and token pooling) the top block ends with that, pooled to ``(B, D, 1, 1)``, as the built-in
ConvNeXt does. Where the blocks are cut comes from timm itself: ``group_matcher(coarse=True)``, the
grouping its layer decay uses (stem, then one group per stage, or per transformer block).
Every spec is checked when it is made: the blocks must hold every tensor of the network and, with
random norm statistics, reproduce timm's pre-logits features. Other networks are refused with one
line naming the supported families.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from core.errors import first_line
from lightning_modules.backbone_base import BackboneError, BackboneSpec, randomise_norms, smallest_input
from lightning_modules.timm_vit import PreLogitsMap, TopUnit, Units, each, eva_units, swin_units, token_units
from lightning_modules.timm_weights import load_pretrained

TIMM_PREFIX = "timm:"
# Bump when the cut of any family changes what the blocks compute (feature cache key).
CUT_VERSION = 1


def _named(net: nn.Module, *names: str) -> Units:
    return [(name, getattr(net, name)) for name in names]


# Each family's forward_features, module by module, then what its forward_head does before the
# classifier when that is more than global average pooling (timm 1.0's code).
def _resnet_units(net: nn.Module) -> Units:
    return _named(net, "conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4")


def _convnext_units(net: nn.Module) -> Units:
    # head = NormMlpClassifierHead: pool, then the final LayerNorm (and MLP, if any) on the pooled vector
    return [
        ("stem", net.stem),
        *each("stages", net.stages),
        ("norm_pre", net.norm_pre),
        ("head", PreLogitsMap(net.head)),
    ]


def _efficientnet_units(net: nn.Module) -> Units:
    return [*_named(net, "conv_stem", "bn1"), *each("blocks", net.blocks), *_named(net, "conv_head", "bn2")]


def _mobilenetv3_units(net: nn.Module) -> Units:
    # forward_head pools, then applies the pretrained 1x1 head conv (+ norm, act) to the pooled map
    head = nn.Sequential(net.global_pool, net.conv_head, net.norm_head, net.act2)
    return [*_named(net, "conv_stem", "bn1"), *each("blocks", net.blocks), ("head", head)]


def _regnet_units(net: nn.Module) -> Units:
    return _named(net, "stem", "s1", "s2", "s3", "s4", "final_conv")


@dataclass(frozen=True)
class _Family:
    module: str  # timm.models.<module>
    cls: str
    names: str  # shown in the refusal
    units: Callable[[nn.Module], Units]
    create_kwargs: dict = field(default_factory=dict)  # timm.create_model's extra arguments
    check_size: int | None = 64  # the fidelity check's input size (None: the model's own input size)
    also_from: tuple[str, ...] = ()  # other timm.models modules that register models of this class


# Any input size that is a multiple of the patch: timm resamples the position embedding (Swin: pads windows).
_DYNAMIC = {"dynamic_img_size": True}
FAMILIES = (
    _Family("resnet", "ResNet", "resnet*/resnext*/seresnet*/wide_resnet*", _resnet_units),
    _Family("convnext", "ConvNeXt", "convnext*/convnextv2*", _convnext_units),
    _Family(
        "efficientnet",
        "EfficientNet",
        "efficientnet*/efficientnetv2*/tf_efficientnet*/mixnet*/mnasnet*",
        _efficientnet_units,
    ),
    _Family("mobilenetv3", "MobileNetV3", "mobilenetv3*/mobilenetv4*/lcnet*", _mobilenetv3_units),
    _Family("regnet", "RegNet", "regnetx*/regnety*", _regnet_units),
    _Family(
        "vision_transformer",
        "VisionTransformer",
        "vit_* (class token, average or attention pool, register tokens; *_clip_*, *_siglip_*, *_dinov2), "
        "deit_*/deit3_*",
        token_units,
        _DYNAMIC,
        None,
        ("deit",),
    ),
    _Family("beit", "Beit", "beit_*/beitv2_*", token_units, check_size=None),
    _Family("eva", "Eva", "eva02_* (rotary position embedding), eva_*", eva_units, _DYNAMIC, None),
    _Family("swin_transformer", "SwinTransformer", "swin_*", swin_units, _DYNAMIC, None),
)
SUPPORTED = "; ".join(f"{f.cls} ({f.names})" for f in FAMILIES)


def _import_timm(name: str):
    try:
        import timm
    except ImportError:
        raise BackboneError(f"model.backbone={name} needs timm: pip install -e '.[timm]'") from None
    return timm


def _family(net: nn.Module) -> _Family | None:
    for family in FAMILIES:
        # the exact class: a subclass may override forward_features
        if type(net) is getattr(importlib.import_module(f"timm.models.{family.module}"), family.cls):
            return family
    return None


def _create_kwargs(model_name: str) -> dict:
    from timm.models._registry import model_entrypoint

    module = model_entrypoint(model_name).__module__.rsplit(".", 1)[-1]
    return next((dict(f.create_kwargs) for f in FAMILIES if module in (f.module, *f.also_from)), {})


def _create(model_name: str, name: str, pretrained: bool = False) -> nn.Module:
    timm = _import_timm(name)
    try:
        # num_classes=0: no classifier (the project's head replaces it); its weights are skipped on load
        return timm.create_model(model_name, pretrained=pretrained, num_classes=0, **_create_kwargs(model_name))
    except RuntimeError as err:
        if pretrained:
            raise
        raise BackboneError(f"model.backbone={name}: {first_line(err, 200)}") from None


def _group_ids(net: nn.Module) -> tuple[dict[str, int], int]:
    """timm's coarse grouping of ``net``'s parameters (stem, stages, ...), and the id of the group of
    names its matcher leaves unmatched (final norms, head convs)."""
    from timm.models._manipulate import group_with_matcher

    sentinel = "\0unmatched"  # no matcher regex matches it: it lands in timm's unmatched group
    names = [(n, None) for n, _ in net.named_parameters()] + [(sentinel, None)]
    ids = group_with_matcher(names, net.group_matcher(coarse=True), reverse=True)
    return ids, ids.pop(sentinel)


def cut(net: nn.Module, name: str) -> list[nn.Module]:
    """The ordered blocks of a timm network of a supported family (see the module docstring)."""
    family = _family(net)
    if family is None:
        raise BackboneError(
            f"model.backbone={name}: timm's {type(net).__name__} is not supported (its forward_features is not "
            f"cut into blocks here); supported timm families: {SUPPORTED}"
        )
    units = family.units(net)
    param_names = {id(p): n for n, p in net.named_parameters()}
    ids, unmatched = _group_ids(net)
    blocks: list[list] = []  # [timm group id or None, modules]
    for unit_name, module in units:
        # the top unit (final norm, pooling) trains with the top block, wherever timm groups it
        params = [] if isinstance(module, TopUnit) else module.parameters()
        groups = {ids[param_names[id(p)]] for p in params} - {unmatched}
        if len(groups) > 1:
            raise BackboneError(f"model.backbone={name}: {unit_name} spans timm's groups {sorted(groups)}")
        group = groups.pop() if groups else None
        if not blocks:
            blocks.append([group, [module]])
        elif group is None or blocks[-1][0] in (None, group):
            # A unit without a group of its own (activation, pool, final norm, head conv) trains with
            # the unit before it: the top stage gets the final norm, as timm's EfficientNet groups it.
            blocks[-1][1].append(module)
            blocks[-1][0] = blocks[-1][0] if group is None else group
        elif group < blocks[-1][0]:
            raise BackboneError(f"model.backbone={name}: {unit_name} runs after a later timm group")
        else:
            blocks.append([group, [module]])
    held = {id(t) for _, module in units for t in [*module.parameters(), *module.buffers()]}
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if id(t) not in held]
    if left:
        raise BackboneError(f"model.backbone={name}: the blocks leave {len(left)} tensors out (e.g. {left[:3]})")
    return [modules[0] if len(modules) == 1 else nn.Sequential(*modules) for _, modules in blocks]


def pre_logits(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What timm feeds its classifier: ``forward_head(forward_features(x), pre_logits=True)``."""
    return net.forward_head(net.forward_features(images), pre_logits=True)


@torch.no_grad()
def _check_blocks(net: nn.Module, blocks: list[nn.Module], name: str, size: int) -> None:
    """Refuse a cut whose blocks, then average pooling, differ from timm's own pre-logits features
    (e.g. a timm version whose forward_features changed)."""
    randomise_norms(net, seed=0)
    net.eval()
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    expected = pre_logits(net, images)
    x = images
    for block in blocks:
        x = block(x)
    if x.dim() != 4:
        raise BackboneError(f"model.backbone={name}: the blocks give a {x.dim()}-d output, not (B, C, H, W)")
    actual = x.mean(dim=(2, 3))
    if actual.shape != expected.shape or not torch.allclose(actual, expected, rtol=1e-4, atol=1e-4):
        raise BackboneError(
            f"model.backbone={name}: its blocks do not reproduce timm's features with this timm version; "
            f"supported timm families: {SUPPORTED}"
        )


@functools.cache
def timm_spec(name: str) -> BackboneSpec:
    """The spec of ``timm:<model name>`` (a tag such as ``resnet50.a1_in1k`` picks the pretrained
    config: mean/std, input size, interpolation). Builds the network once, with random weights."""
    model_name = name[len(TIMM_PREFIX) :]
    timm = _import_timm(name)
    if not model_name or not timm.is_model(model_name):
        raise BackboneError(
            f"model.backbone={name}: timm {timm.__version__} has no model {model_name!r} "
            f"(list them: python -c \"import timm; print(timm.list_models('resnet*'))\")"
        )
    build = functools.partial(_create, model_name, name)
    net = build()
    blocks = cut(net, name)
    data = timm.data.resolve_model_data_config(net)
    _check_blocks(net, blocks, name, _family(net).check_size or int(data["input_size"][-1]))
    patch = _patch_size(net)
    return BackboneSpec(
        name,
        build,
        functools.partial(_split, name=name),
        len(blocks),
        tuple(data["mean"]),
        tuple(data["std"]),
        load_pretrained=functools.partial(load_pretrained, functools.partial(_create, model_name, name, True), name),
        version=CUT_VERSION,
        default_image_size=int(data["input_size"][-1]),
        interpolation=str(data["interpolation"]),
        crop_pct=float(data["crop_pct"]),
        size_multiple=patch,
        fixed_size=bool(getattr(getattr(net, "patch_embed", None), "strict_img_size", False)),
        # a timm network is not declared here: measured once (a ViT takes any multiple of its patch)
        min_image_size=patch if patch > 1 else smallest_input(net),
    )


def _patch_size(net: nn.Module) -> int:
    """The input size must be a multiple of a token network's patch (timm asserts it); 1 for a CNN."""
    patch_embed = getattr(net, "patch_embed", None)
    return int(getattr(patch_embed, "patch_size", (1,))[0])


def _split(net: nn.Module, name: str) -> list[nn.Module]:
    return cut(net, name)
