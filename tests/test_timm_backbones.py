"""model.backbone=timm:<name>: blocks, weights, refusals and the stages with a timm network."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch.utils.checkpoint import checkpoint

timm = pytest.importorskip("timm", reason="pip install -e '.[timm]'")

from core.errors import ConfigError  # noqa: E402
from lightning_modules.backbones import BackboneError, WeightsError, backbone_spec, build_backbone  # noqa: E402
from lightning_modules.freeze_schedule import set_trainable  # noqa: E402
from lightning_modules.heads import make_pool  # noqa: E402
from lightning_modules.timm_backbones import cut, pre_logits, randomise_norms, timm_spec  # noqa: E402
from pipeline.config.load import load_config  # noqa: E402
from pipeline.export import export_model, run_exported  # noqa: E402
from pipeline.prediction import load_model  # noqa: E402

from conftest import fast_args  # noqa: E402
from helpers import (  # noqa: E402
    assert_only_the_head_trains,
    block_of,
    checkpoint_state,
    initial_state,
    run_dir,
    run_train,
    scalar_tags,
)

# float32 on the same inputs: only kernel choice and summation order differ
PARITY_TOLERANCE = 1e-4

# Small networks of each supported family, with the number of blocks timm's coarse grouping gives.
FAMILIES = {
    "resnet18": 5,  # stem, layer1-4
    "convnext_atto": 5,  # stem, stages 0-3 (+ the final LayerNorm)
    "efficientnet_b0": 8,  # stem, blocks 0-6 (+ conv_head, bn2, as timm groups them)
    "mobilenetv3_small_050": 7,  # stem, blocks 0-5 (+ the pooled head conv)
    "regnetx_002": 5,  # stem, s1-s4
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
@torch.no_grad()
def test_blocks_compute_timms_pre_logits_features(name, tmp_path):
    """Blocks in order, then the head's average pooling, equal timm's own
    forward_head(forward_features(x), pre_logits=True), with the weights loaded through
    model.weights=PATH from a full timm state dict (its classifier included)."""
    torch.manual_seed(0)
    source = timm.create_model(name, pretrained=False).eval()  # with its 1000-class classifier
    randomise_norms(source, seed=1)
    path = tmp_path / f"{name}.pth"
    torch.save(source.state_dict(), path)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    expected = source.forward_head(source.forward_features(images), pre_logits=True)

    backbone = build_backbone(f"timm:{name}", weights=path).eval()
    assert len(backbone.blocks) == FAMILIES[name] == backbone_spec(f"timm:{name}").num_blocks
    features = backbone(images)
    assert features.dim() == 4
    actual = make_pool("avg")(features)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# The smallest config of each family timm cuts, shrunk further where timm allows (img_size, depth,
# width): (timm.create_model's arguments, the number of blocks). Tokens at 32 px: a few per image.
TINY = {"img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 2}
SMALL_FAMILIES = {
    "vit_tiny_patch16_224": ({"img_size": 32, "depth": 3}, 4),  # class token; stem, blocks 0-2 (+ norm)
    "vit_small_patch14_reg4_dinov2": ({**TINY, "img_size": 28}, 3),  # register tokens, layer scale
    "vit_base_patch16_clip_224": (TINY, 3),  # norm_pre
    "vit_base_patch16_siglip_224": (TINY, 3),  # attention pool ("map")
    "vit_base_patch16_siglip_gap_224": (TINY, 3),  # average pool, no class token
    "deit3_small_patch16_224": (TINY, 3),  # position embedding without the class token's
    "beit_base_patch16_224": (TINY, 3),  # relative position bias per block, average pool + fc_norm
    "eva02_tiny_patch14_224": ({"img_size": 28, "depth": 2}, 3),  # rotary position embedding in every block
    "eva02_base_patch16_clip_224": (TINY, 3),  # EVA-CLIP's image tower
    "swin_tiny_patch4_window7_224": (
        {"img_size": 56, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "embed_dim": 24},
        5,
    ),  # NHWC stages
    "convnextv2_atto": ({"depths": (1, 1, 1, 1)}, 5),  # GRN
    "tf_efficientnetv2_b0": ({}, 7),
    "regnety_002": ({}, 5),  # squeeze-excitation
}


@pytest.mark.parametrize("name", sorted(SMALL_FAMILIES))
@torch.no_grad()
def test_each_family_is_cut_into_blocks_that_compute_timms_pre_logits_features(name):
    """Blocks in order, then the head's average pooling, equal timm's
    forward_head(forward_features(x), pre_logits=True), with random norms; the top block holds the
    final norm and whatever timm's head has before its classifier (fc_norm, attention pool)."""
    kwargs, n_blocks = SMALL_FAMILIES[name]
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    blocks = cut(net, f"timm:{name}")
    randomise_norms(net, seed=1)
    size = kwargs.get("img_size", 64)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    expected = pre_logits(net, images)
    features = images
    for block in blocks:
        features = block(features)
    assert len(blocks) == n_blocks
    assert features.dim() == 4  # (B, D, 1, 1) from a top unit; a CNN's map, which the head pools
    torch.testing.assert_close(make_pool("avg")(features), expected, rtol=1e-5, atol=1e-5)
    top = {id(p) for p in blocks[-1].parameters()}
    final = [n for n, p in net.named_parameters() if n.startswith(("norm.", "fc_norm.", "head.", "attn_pool."))]
    assert all(id(p) in top for n, p in net.named_parameters() if n in final)


def test_preprocessing_comes_from_timms_pretrained_config():
    spec = backbone_spec("timm:resnet18")
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert (spec.default_image_size, spec.interpolation) == (224, "bicubic")  # resnet18.a1_in1k
    assert backbone_spec("timm:resnet18.tv_in1k").interpolation == "bilinear"
    lite = build_backbone("timm:tf_efficientnet_lite0")
    assert lite.mean == lite.std == (0.5, 0.5, 0.5)
    assert (lite.default_image_size, lite.interpolation) == (224, "bicubic")


def test_convnext_top_block_ends_with_the_final_norm_and_trains_with_it():
    backbone = build_backbone("timm:convnext_atto")
    assert backbone.output_shape(64) == (320, 1, 1)  # pooled before the norm, as timm does
    top = backbone.blocks[-1]
    norm = top[-1].head.norm
    set_trainable(backbone.blocks, (4,), train_bn=False)
    assert norm.weight.requires_grad and all(p.requires_grad for p in top.parameters())
    assert not any(p.requires_grad for p in backbone.blocks[-2].parameters())


def _error(args: list[str]) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(args)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_other_families_are_refused_with_the_supported_ones():
    message = _error(["model.backbone=timm:levit_128s"])
    assert "LevitDistilled is not supported" in message
    for family in ("ResNet", "ConvNeXt", "EfficientNet", "MobileNetV3", "RegNet", "VisionTransformer", "Eva", "Swin"):
        assert family in message


def test_unknown_timm_model_and_builtin_name_are_one_line():
    assert "has no model 'no_such_net'" in _error(["model.backbone=timm:no_such_net"])
    assert "or timm:<name>" in _error(["model.backbone=vgg19"])


def test_plan_counts_the_timm_blocks():
    assert "the backbone has 8" in _error(["model.backbone=timm:efficientnet_b0", "finetune.unfreeze_blocks=9"])


def test_without_timm_the_error_says_how_to_install(monkeypatch):
    timm_spec.cache_clear()
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(BackboneError) as exc:
        backbone_spec("timm:resnet18")
    assert str(exc.value) == "model.backbone=timm:resnet18 needs timm: pip install -e '.[timm]'"
    monkeypatch.undo()
    timm_spec.cache_clear()


@pytest.mark.parametrize(
    "name, url",
    [
        ("resnet18", "https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/model.safetensors"),
        ("test_vit", "https://huggingface.co/timm/test_vit.r160_in1k/resolve/main/model.safetensors"),
    ],
)
def test_offline_pretrained_download_is_one_line_naming_the_file_to_fetch(monkeypatch, name, url):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")  # not from a cache another run filled
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", "/nonexistent-hf-home/hub")
    with pytest.raises(WeightsError) as exc:
        build_backbone(f"timm:{name}", pretrained=True)
    message = str(exc.value)
    assert "\n" not in message and f"timm:{name}" in message and "HF_HUB_OFFLINE is set" in message
    for hint in (f"fetch {url} elsewhere", "model.weights=PATH/TO/model.safetensors", "model.pretrained=false"):
        assert hint in message


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_timm_weights_file_is_loaded(tmp_path, suffix):
    torch.manual_seed(3)
    net = timm.create_model("resnet18")  # with its classifier (fc.*), which the backbone ignores
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(net.state_dict(), path)
    else:
        torch.save(net.state_dict(), path)
    backbone = build_backbone("timm:resnet18", weights=path)
    assert torch.equal(backbone.blocks[0][0].weight, net.conv1.weight)
    assert torch.equal(backbone.blocks[4][1].bn2.running_var, net.layer4[1].bn2.running_var)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@torch.no_grad()
def test_a_vits_saved_state_dict_loads_back_with_equal_outputs(tmp_path, suffix):
    """A timm ViT's full state dict (its classifier too), saved by the test as the Hub's
    model.safetensors or as a .pth, loads through model.weights=PATH: the same pre-logits features."""
    torch.manual_seed(4)
    source = timm.create_model("test_vit", pretrained=False).eval()  # 1000 classes, 160 px position grid
    randomise_norms(source, seed=5)
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)
    backbone = build_backbone("timm:test_vit", weights=path).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(backbone(images).flatten(1), pre_logits(source, images), rtol=1e-5, atol=1e-5)


def test_timm_weights_missing_backbone_tensors_are_refused(tmp_path):
    state = {k: v for k, v in timm.create_model("convnext_atto").state_dict().items() if k != "head.norm.weight"}
    path = tmp_path / "no_final_norm.pth"
    torch.save(state, path)
    with pytest.raises(
        WeightsError, match=r"does not fit timm:convnext_atto: 1 of its tensors are missing.*head\.norm"
    ):
        build_backbone("timm:convnext_atto", weights=path)


def test_timm_weights_of_another_shape_are_one_line(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(timm.create_model("resnet50").state_dict(), path)
    with pytest.raises(WeightsError, match=r"does not fit timm:resnet18: size mismatch for layer1\.0\.conv1") as exc:
        build_backbone("timm:resnet18", weights=path)
    assert "\n" not in str(exc.value)


# --- the stages with a timm backbone (random weights, generated images) -------------------------


@pytest.fixture(scope="module")
def timm_args(tmp_path_factory) -> dict[str, str]:
    """timm:resnet18 from a local file of random weights with random norms: timm zero-initialises
    the last BatchNorm of every residual block, and with frozen BatchNorm (finetune.train_bn=false)
    the conv before it would then get no gradient at all."""
    torch.manual_seed(5)
    net = timm.create_model("resnet18")
    randomise_norms(net, seed=6)
    path = tmp_path_factory.mktemp("timm_weights") / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return {"model.backbone": "timm:resnet18", "model.weights": str(path)}


@pytest.fixture(scope="module")
def finetuned(toy_root, tmp_path_factory, timm_args):
    settings = {"finetune.warmup_epochs": "1", "finetune.unfreeze_blocks": "1", "trainer.max_epochs": "2"}
    args = fast_args(toy_root, tmp_path_factory.mktemp("timm_ft"), stage="finetune", **timm_args, **settings)
    before = initial_state(args)
    metrics = run_train(args)
    return before, metrics


def test_finetune_trains_only_the_top_block_and_the_head(finetuned):
    before, metrics = finetuned
    after = checkpoint_state(run_dir(metrics) / "checkpoints" / "last.ckpt")
    bn = {k for k in before if k.rsplit(".", 1)[0] in {m.rsplit(".", 1)[0] for m in before if "running_mean" in m}}
    lower = [k for k in before if k.startswith("backbone.") and block_of(k) < 4]
    top_conv = [k for k in before if k.startswith("backbone.blocks.4.") and k not in bn and k.endswith("weight")]
    top_bn = [k for k in before if k.startswith("backbone.blocks.4.") and k in bn and "num_batches" not in k]
    head = [k for k in before if k.startswith("head.") and k.endswith("weight")]
    assert lower and top_conv and top_bn and head
    assert all(torch.equal(before[k], after[k]) for k in lower), "a lower block changed"
    assert all(not torch.equal(before[k], after[k]) for k in top_conv), "an unfrozen conv did not train"
    assert all(torch.equal(before[k], after[k]) for k in top_bn), "frozen BatchNorm of the top block changed"
    assert all(not torch.equal(before[k], after[k]) for k in head), "the head did not train"
    scalars = scalar_tags(run_dir(metrics))
    assert "lr/block4" in scalars and "lr/block3" not in scalars  # one optimizer group for the one block
    counts = [v for _, v in sorted(scalars["trainable_params"])]
    assert len(counts) == 2 and counts[0] < counts[1]


def test_torchscript_export_of_the_timm_model_matches_its_probabilities(finetuned, tmp_path):
    model = load_model(finetuned[1]["best_ckpt"])
    path, diff = export_model(model, 32, "torchscript", tmp_path / "model.torchscript")
    assert diff <= PARITY_TOLERANCE
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.probabilities(model.logits(images))
    assert (run_exported("torchscript", path, images) - expected).abs().max() <= PARITY_TOLERANCE


def test_frozen_stage_with_a_timm_backbone_changes_only_the_head(toy_root, tmp_path, timm_args):
    args = fast_args(toy_root, tmp_path, stage="frozen", **timm_args, **{"trainer.max_epochs": "2"})
    assert_only_the_head_trains(args)


def test_features_stage_with_a_timm_backbone_caches_features(toy_root, tmp_path, timm_args):
    cache = tmp_path / "cache"
    args = fast_args(toy_root, tmp_path, stage="features", **timm_args, **{"data.cache_dir": str(cache)})
    metrics = run_train(args)
    assert metrics["feature_cache"]["built"] is True
    assert len(list(cache.glob("*.pt"))) == 1
    assert 0.0 <= metrics["test"]["acc"] <= 1.0


# --- each model's own preprocessing ---------------------------------------------------------------

CLIP_MEAN, CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)


def test_a_clip_model_brings_clips_mean_std_and_input_size():
    cfg = load_config(["model.backbone=timm:vit_base_patch32_clip_224.openai"])
    assert cfg.data.image_size == 224  # data.image_size=null: the weights' own size
    spec = backbone_spec(cfg.model.backbone)
    assert spec.mean == pytest.approx(CLIP_MEAN, abs=1e-4) and spec.std == pytest.approx(CLIP_STD, abs=1e-4)
    assert (spec.interpolation, spec.crop_pct) == ("bicubic", 0.9)
    vit = backbone_spec("timm:vit_tiny_patch16_224")  # augreg weights: Inception-style 0.5 / 0.5
    assert vit.mean == vit.std == (0.5, 0.5, 0.5)
    assert load_config(["model.backbone=timm:test_vit"]).data.image_size == 160
    assert load_config(["model.backbone=timm:test_vit", "data.image_size=64"]).data.image_size == 64
    assert load_config(["model.backbone=vgg16"]).data.image_size == 150  # the seed's


def test_an_image_size_the_network_cannot_take_is_one_line():
    message = _error(["model.backbone=timm:test_vit", "data.image_size=150"])
    assert "data.image_size=150 is not a multiple of timm:test_vit's patch size 16; use e.g. 144 or 160" in message
    message = _error(["model.backbone=timm:beit_base_patch16_224", "data.image_size=160"])
    assert "timm:beit_base_patch16_224 takes 224 px images only; use data.image_size=224 (or null)" in message


def test_mean_std_reach_the_transforms_the_checkpoint_and_the_loaded_model(toy_root, tmp_path):
    """data.mean/std (here CLIP's, on a tiny ViT) normalise the training images, are recorded in the
    checkpoint's identity and hyperparameters, and come back with the model predict.py loads; so
    does the weights' centre crop at evaluation (test_vit's crop_pct 0.95: 33 px, centre 32)."""
    from pipeline.runner.build import build_stage

    clip = {"data.mean": f"[{','.join(map(str, CLIP_MEAN))}]", "data.std": f"[{','.join(map(str, CLIP_STD))}]"}
    args = fast_args(toy_root, tmp_path, stage="frozen", **{"model.backbone": "timm:test_vit", **clip})
    args += ["trainer.max_epochs=1", "trainer.limit_train_batches=1"]
    images = build_stage(load_config(args)).images
    images.setup("fit")
    for split in ("train", "val"):
        normalise = [t for t in images.datasets[split].transform.transforms if hasattr(t, "mean")][-1]
        assert tuple(normalise.mean) == pytest.approx(CLIP_MEAN) and tuple(normalise.std) == pytest.approx(CLIP_STD)
    evaluation = [type(t).__name__ for t in images.datasets["val"].transform.transforms]
    assert evaluation[1:3] == ["Resize", "CenterCrop"] and images.datasets["val"].transform.transforms[1].size == [
        33,
        33,
    ]
    assert "CenterCrop" not in [type(t).__name__ for t in images.datasets["train"].transform.transforms]
    metrics = run_train(args)
    ckpt = torch.load(metrics["best_ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["identity"]["mean"] == pytest.approx(CLIP_MEAN) and ckpt["identity"]["std"] == pytest.approx(CLIP_STD)
    model = load_model(metrics["best_ckpt"])
    assert model.backbone.mean == pytest.approx(CLIP_MEAN) and model.backbone.std == pytest.approx(CLIP_STD)
    assert ckpt["identity"]["crop_pct"] == model.backbone.crop_pct == 0.95


# --- memory: gradient checkpointing -------------------------------------------------------------


def test_grad_checkpointing_gives_the_same_gradients(monkeypatch):
    """model.grad_checkpointing: every block the gradient passes through is recomputed in the
    backward pass (torch.utils.checkpoint), with exactly the gradients of a plain backward."""
    import lightning_modules.backbone_base as backbone_base

    backbone = build_backbone("timm:test_vit").train()
    set_trainable(backbone.blocks, (4, 5, 6), train_bn=True)  # the stem and the lower blocks stay frozen
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    calls = []
    monkeypatch.setattr(backbone_base, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))

    def gradients(enabled: bool) -> dict[str, torch.Tensor]:
        backbone.zero_grad(set_to_none=True)
        backbone.grad_checkpointing = enabled
        backbone(images).square().sum().backward()
        return {n: p.grad.clone() for n, p in backbone.named_parameters() if p.requires_grad}

    plain = gradients(False)
    assert not calls
    recomputed = gradients(True)
    assert len(calls) == 3  # the three trained blocks; frozen ones below keep nothing to recompute
    assert plain.keys() == recomputed.keys() and plain
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-6)


# --- a toy ViT learns under stage=finetune ----------------------------------------------------------


def test_a_tiny_vit_learns_the_toy_task_under_finetune_and_exports(toy_root, tmp_path):
    """timm's test_vit (random init, 64 wide, patch 16: four tokens at 32 px) fine-tuned with its
    top two blocks, gradient checkpointing on: training accuracy rises, validation is well above
    chance, only the top blocks of the backbone change, and the TorchScript and ONNX exports agree."""
    settings = {
        "model.backbone": "timm:test_vit",
        "finetune.blocks": "top:2",
        "finetune.backbone_lr_ratio": "0.3",
        "optim.lr": "1e-3",
        "model.grad_checkpointing": "true",
        "trainer.max_epochs": "2",
    }
    args = fast_args(toy_root, tmp_path, stage="finetune", **settings)
    before = initial_state(args)
    metrics = run_train(args)
    scalars = scalar_tags(run_dir(metrics))
    accuracy = [v for _, v in sorted(scalars["train/acc"])]
    assert len(accuracy) == 2 and accuracy[0] < accuracy[1]
    assert metrics["val"]["acc"] >= 0.9, metrics["val"]  # chance is 0.5
    after = checkpoint_state(run_dir(metrics) / "checkpoints" / "last.ckpt")
    changed = {block_of(k) for k in before if k.startswith("backbone.") and not torch.equal(before[k], after[k])}
    assert changed == {5, 6}  # of stem + 6 blocks; the top one holds the final norm
    model = load_model(metrics["best_ckpt"])
    assert export_model(model, 32, "torchscript", tmp_path / "vit.torchscript")[1] <= PARITY_TOLERANCE
    if all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")):  # the [export] extra
        assert export_model(model, 32, "onnx", tmp_path / "vit.onnx")[1] <= PARITY_TOLERANCE
