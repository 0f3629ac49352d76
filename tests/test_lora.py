"""finetune.method=lora: low-rank adapters (peft) train in the plan's blocks instead of their weights."""

from __future__ import annotations

import pytest
import torch

from conftest import fast_args
from helpers import checkpoint_state, initial_state, run_dir, run_train, sigterm_then_resume

pytest.importorskip("peft", reason="pip install -e '.[lora]'")
pytest.importorskip("timm", reason="pip install -e '.[timm]'")

# timm's test_vit: random init, 64 wide, patch 16 (four tokens at 32 px); adapters on qkv/proj/fc1/fc2
LORA = {
    "model.backbone": "timm:test_vit",
    "finetune.method": "lora",
    "finetune.blocks": "top:2",
    "finetune.lora_rank": "4",
    "optim.lr": "3e-3",
    "trainer.max_epochs": "3",
}


def _args(root, out, **extra):
    return fast_args(root, out, stage="finetune", **(LORA | extra))


def test_only_the_adapters_of_the_trained_blocks_and_the_head_change(toy_root, tmp_path):
    args = _args(toy_root, tmp_path)
    before = initial_state(args)
    metrics = run_train(args)
    after = checkpoint_state(run_dir(metrics) / "checkpoints" / "last.ckpt")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapters = {k for k in before if "lora_" in k}
    assert adapters and {k for k in changed if k.startswith("backbone.")} <= adapters  # no base weight moved
    trained = {int(k.split(".")[2]) for k in changed if k.startswith("backbone.")}
    assert trained == {5, 6}  # the top two blocks' adapters (of stem + 6 blocks)
    assert any(k.startswith("head.") for k in changed)
    base = sum(v.numel() for k, v in before.items() if k.startswith("backbone.") and "lora_" not in k)
    assert 0 < metrics["trainable_params"] < base / 10  # adapters and head: a small fraction
    assert metrics["val"]["acc"] >= 0.75


def test_merged_adapters_give_the_same_outputs_and_predict_uses_them(toy_root, tmp_path):
    from pipeline.prediction import load_model
    from pipeline.runner.checkpoints import model_from_checkpoint

    metrics = run_train(_args(toy_root, tmp_path, **{"trainer.max_epochs": "2"}))
    unmerged = model_from_checkpoint(metrics["best_ckpt"]).eval()
    merged = load_model(metrics["best_ckpt"])  # predict.py's and the exports' model
    layers = [m for m in merged.modules() if hasattr(m, "lora_A") and hasattr(m, "merge")]
    assert layers and all(m.merged for m in layers)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (unmerged.logits(images) - merged.logits(images)).abs().max() <= 1e-5


def test_a_lora_run_resumes_exactly(toy_root, tmp_path, monkeypatch, capsys, uninterrupted):
    args_for = lambda out: _args(toy_root, out)  # noqa: E731
    want = uninterrupted(args_for)
    _, got = sigterm_then_resume(monkeypatch, capsys, args_for(tmp_path / "out"), step=9)  # in the adapter phase
    a = checkpoint_state(run_dir(want) / "checkpoints" / "last.ckpt")
    b = checkpoint_state(run_dir(got) / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # two processes (gloo)
def test_adapters_train_identically_on_both_ranks_and_nothing_else_moves(toy_root, tmp_path):
    """DDP on CPU: only the adapters (of the top two blocks) and the head require gradients when each phase's
    fit wraps the model, so DDP syncs exactly them: the replicas agree after every epoch, no base weight moves."""
    from test_ddp import run_script

    from helpers import scalar_tags

    args = _args(toy_root, tmp_path / "out", **{"trainer.devices": "2", "data.batch_size": "4"})
    before = initial_state(_args(toy_root, tmp_path / "init"))
    run_script(args, tmp_path)
    [run] = [p for p in (tmp_path / "out").glob("finetune_*/*") if p.is_dir()]  # both ranks used one folder
    diffs = [v for _, v in sorted(scalar_tags(run)["ddp/differing_tensors"])]
    assert len(diffs) == 3 and max(diffs) == 0.0, diffs
    after = checkpoint_state(run / "checkpoints" / "last.ckpt")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k for k in changed if k.startswith("backbone.")} <= {k for k in before if "lora_" in k}
    assert {int(k.split(".")[2]) for k in changed if k.startswith("backbone.")} == {5, 6}


def test_adapters_fit_a_cnn_whose_convolutions_are_a_subclass():
    """EfficientNet-Lite's pointwise convolutions are ``Conv2dStaticSamePadding``, which peft cannot copy
    (its constructor needs an image size): they become plain convolutions with the same parameters; the
    network computes the same before training (lora_B starts at zero), and every pointwise layer is adapted."""
    import copy

    from lightning_modules.backbones import build_backbone
    from lightning_modules.lora import add_adapters, has_adapters

    base = build_backbone("efficientnet_lite0", pretrained=True).eval()
    adapted = copy.deepcopy(base)
    add_adapters(adapted, {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": None})
    assert has_adapters(adapted)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(base(images), adapted.eval()(images), atol=1e-6)
    adapted_names = {n.rsplit(".base_layer", 1)[0] for n, _ in adapted.named_modules() if n.endswith(".base_layer")}
    convolutions = [(n, m) for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d)]
    pointwise = {n for n, m in convolutions if m.kernel_size == (1, 1) and m.groups == 1}
    assert adapted_names == pointwise and len(pointwise) > 20
