"""Grad-CAM: maps in [0, 1] at the input's size, overlays per image from predict.py cam_dir=."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from lightning_modules.cam import cam_target, gradcam
from pipeline.prediction import load_model

from conftest import fast_args
from helpers import run_train
from toy_data import make_image_tree

pytest.importorskip("pytorch_grad_cam", reason="pip install -e '.[cam]'")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    root = make_image_tree(tmp_path_factory.mktemp("cam_data"), size=32)
    return run_train(fast_args(root, tmp_path_factory.mktemp("cam_run"), stage="frozen"))["best_ckpt"]


def test_gradcam_maps_leave_the_model_as_it_was(ckpt):
    model = load_model(ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    images = torch.randn(3, 3, 32, 32)
    maps = gradcam(model, images, [0, 1, 1], model.binary)
    assert maps.shape == (3, 32, 32) and maps.min() >= 0 and maps.max() <= 1 and maps.max() > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    # the class matters: evidence for one class of a binary model is evidence against the other
    other = gradcam(model, images, [1, 0, 0], model.binary)
    assert not np.allclose(maps, other)


def test_the_cam_layer_is_spatial_even_when_the_top_block_pools():
    from lightning_modules.backbones import build_backbone

    backbone = build_backbone("convnext_tiny")
    layer = cam_target(backbone, 64).layer
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    backbone.eval()(torch.zeros(1, 3, 64, 64))
    assert seen and seen[0][2] * seen[0][3] > 1


def test_predict_cam_dir_writes_one_overlay_per_readable_image_at_its_size(ckpt, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    sizes = {"wide.png": (60, 30), "square.jpg": (40, 40)}
    rng = np.random.default_rng(0)
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"not an image")
    cams = tmp_path / "cams"
    predict.main(
        [f"ckpt_path={ckpt}", f"inputs={folder}", f"output={tmp_path / 'p.csv'}", f"cam_dir={cams}", "num_workers=0"]
    )
    written = sorted(p.name for p in cams.iterdir())
    assert written == ["square.gradcam.png", "wide.gradcam.png"]
    for name, size in sizes.items():
        with Image.open(cams / f"{Path(name).stem}.gradcam.png") as image:
            assert image.size == size and image.mode == "RGB"
