"""The feature cache key changes with the code that determines the features, and only then."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from datamodules import image_io, transforms
from datamodules.data_index import scan_splits
from datamodules.feature_cache import cache_key
from datamodules.image_folder import ImageFolderDataModule
from lightning_modules.backbones import BACKBONES, build_backbone


def _key(root, backbone_version: int | None = None, pool: str = "avg", **preprocessing) -> str:
    # rebuilt from scratch every time: equal keys must not depend on reusing objects
    settings = {"image_size": 24, "batch_size": 4, "num_workers": 0, "augment": "none"} | preprocessing
    images = ImageFolderDataModule(scan_splits(root), **settings)
    torch.manual_seed(0)
    backbone = build_backbone("resnet18")
    if backbone_version is not None:
        backbone.version = backbone_version
    return cache_key(images, SimpleNamespace(backbone=backbone), pool)


def test_same_inputs_and_code_give_the_same_key(toy_root):
    assert _key(toy_root) == _key(toy_root)


@pytest.mark.parametrize("module, constant", [(transforms, "PREPROCESSING_VERSION"), (image_io, "DECODE_VERSION")])
def test_code_version_changes_the_key(toy_root, monkeypatch, module, constant):
    before = _key(toy_root)
    monkeypatch.setattr(module, constant, getattr(module, constant) + 1)
    assert _key(toy_root) != before


@pytest.mark.parametrize(
    "change",
    [
        {"pool": "flatten"},
        {"image_size": 32},
        {"mean": (0.4815, 0.4578, 0.4082)},  # CLIP's, e.g. data.mean=...
        {"std": (0.2686, 0.2613, 0.2758)},
        {"interpolation": "bicubic"},
        {"crop_pct": 0.9},  # timm's centre crop at evaluation
    ],
)
def test_pooling_and_preprocessing_change_the_key(toy_root, change):
    assert _key(toy_root, **change) != _key(toy_root)


def test_backbone_version_changes_the_key(toy_root):
    assert _key(toy_root, BACKBONES["resnet18"].version + 1) != _key(toy_root)


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny"])
def test_backbone_carries_its_specs_version(name):
    assert build_backbone(name).version == BACKBONES[name].version
    # ConvNeXt's cut gained its final LayerNorm (issue 11): features cached before are stale
    assert BACKBONES["convnext_tiny"].version >= 2
