"""``finetune.method=lora``: low-rank adapters (Hu et al., ICLR 2022) on the cut backbone, through Hugging
Face ``peft`` (the ``[lora]`` extra), instead of unfreezing the blocks' weights.

``peft.inject_adapter_in_model`` works on any ``nn.Module``: each targeted ``Linear`` / ``Conv2d`` keeps its
weights as ``base_layer`` and gains ``lora_A`` / ``lora_B``. The plan is unchanged (head warm-up, then the
chosen blocks); in a block that trains, only its adapters do (``adapter_only`` for ``set_trainable``), so
DDP registers exactly what trains. Checkpoints hold base weights and adapters; ``predict.py`` and the
exports use the merged model (each layer's ``merge()``: ``W + scale * B @ A``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.errors import ConfigError

# timm's transformer blocks (ViT, DeiT, BEiT, EVA, Swin): attention in/out and the MLP's two layers
TRANSFORMER_TARGETS = ("qkv", "proj", "fc1", "fc2")


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError("finetune.method=lora needs Hugging Face peft: pip install -e '.[lora]'") from None
    return peft


def default_targets(backbone: nn.Module) -> list[str]:
    """What adapters go on, per family: a transformer's attention and MLP layers; a CNN's pointwise
    (1x1) convolutions, where most of its weights are (MobileNet/EfficientNet expansions and
    projections, ResNet bottlenecks)."""
    names = [name for name, module in backbone.named_modules() if isinstance(module, nn.Linear)]
    if any(name.rsplit(".", 1)[-1] in TRANSFORMER_TARGETS for name in names):
        return list(TRANSFORMER_TARGETS)
    pointwise = [
        name
        for name, module in backbone.named_modules()
        if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
    ]
    if not pointwise:
        raise ConfigError(
            "finetune.method=lora: this backbone has no attention, MLP or 1x1 layers; set finetune.lora_targets"
        )
    return pointwise


def add_adapters(backbone: nn.Module, options: dict[str, Any]) -> None:
    """Adapters on ``backbone``'s targeted layers (``options``: rank, alpha, dropout, targets)."""
    peft = _peft()
    targets = list(options.get("targets") or default_targets(backbone))
    plain_convolutions(backbone, targets)
    config = peft.LoraConfig(
        r=int(options["rank"]), lora_alpha=float(options["alpha"]), lora_dropout=float(options["dropout"]),
        target_modules=targets,
    )
    try:
        peft.inject_adapter_in_model(config, backbone)
    except ValueError as err:  # no layer matched the targets
        raise ConfigError(f"finetune.lora_targets={targets}: {str(err).splitlines()[0][:200]}") from None


def _targeted(name: str, targets: list[str]) -> bool:
    """peft's rule for a list of target names: the module's name is one, or ends with ``.<one>``."""
    return any(name == t or name.endswith(f".{t}") for t in targets)


def plain_convolutions(backbone: nn.Module, targets: list[str]) -> None:
    """Targeted convolutions of a ``Conv2d`` subclass become plain ``nn.Conv2d`` with the same parameters.

    peft builds a convolution's ``lora_B`` as ``type(layer)(...)``, which a subclass with its own
    constructor refuses (EfficientNet-Lite's ``Conv2dStaticSamePadding`` needs an ``image_size``). A
    pointwise one pads nothing, so the plain layer computes the same (checked on a random input here); a
    subclass that computes something else is refused in one line."""
    for name, module in list(backbone.named_modules()):
        if type(module) is nn.Conv2d or not isinstance(module, nn.Conv2d) or not _targeted(name, targets):
            continue
        plain = nn.Conv2d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, module.bias is not None, module.padding_mode,
        )  # fmt: skip
        plain.weight, plain.bias = module.weight, module.bias  # the same parameters: names and state unchanged
        probe = torch.randn(1, module.in_channels, 9, 9, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            same = module(probe).shape == plain(probe).shape and torch.allclose(module(probe), plain(probe))
        if not same:
            raise ConfigError(
                f"finetune.method=lora: {name} is a {type(module).__name__}, which peft cannot wrap and which "
                "differs from a plain Conv2d; leave it out with finetune.lora_targets=[...]"
            )
        parent, _, leaf = name.rpartition(".")
        setattr(backbone.get_submodule(parent) if parent else backbone, leaf, plain)


def is_adapter(module_name: str) -> bool:
    return "lora_" in module_name


def has_adapters(module: nn.Module) -> bool:
    return any(is_adapter(name) for name, _ in module.named_modules())


def load_base_weights(backbone: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Pretrained weights (plain names) into a backbone with adapters, where a targeted layer's
    weights live under ``base_layer``; every base weight must be found, the adapters keep their init."""
    own = backbone.state_dict()
    mapped = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        based = f"{head}.base_layer.{leaf}" if head else f"base_layer.{leaf}"
        mapped[key if key in own else based] = value
    missing, unexpected = backbone.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not is_adapter(k)]
    if missing or unexpected:
        raise ConfigError(f"pretrained weights do not fit the backbone with adapters: {(missing + unexpected)[:3]}")


def merge_adapters(model: nn.Module) -> int:
    """Fold every adapter into its layer's weights (inference and exports); how many layers."""
    layers = [m for m in model.modules() if hasattr(m, "merge") and hasattr(m, "lora_A")]
    for layer in layers:
        if not getattr(layer, "merged", False):
            layer.merge()
    return len(layers)
