"""Weights change only where the schedule says they may, and resumed runs stay unfrozen."""

from __future__ import annotations

import torch

from conftest import fast_args
from helpers import (
    assert_only_the_head_trains,
    block_of,
    checkpoint_state,
    conv_weights,
    initial_state,
    run_dir,
    run_train,
    scalar_tags,
)


def test_frozen_stage_changes_only_the_head(toy_root, tmp_path, weights_file):
    args = fast_args(toy_root, tmp_path, stage="frozen", **{"model.weights": str(weights_file)})
    assert_only_the_head_trains(args)


def _finetune_args(toy_root, tmp_path, weights_file, **extra: str) -> list[str]:
    """Fine-tuning from a local weights file, one warm-up epoch, then ``extra``'s settings."""
    settings = {"model.weights": str(weights_file), "finetune.warmup_epochs": "1"}
    return fast_args(toy_root, tmp_path, stage="finetune", **settings | extra)


def _finetune(toy_root, tmp_path, weights_file, **extra):
    args = _finetune_args(
        toy_root, tmp_path, weights_file, **{"finetune.unfreeze_blocks": "2", "optim.lr": "1e-3"} | extra
    )
    before = initial_state(args)
    metrics = run_train(args)
    return before, checkpoint_state(run_dir(metrics) / "checkpoints" / "last.ckpt"), metrics


def _bn_keys(model_state) -> set[str]:
    # BatchNorm tensors: every key whose module also has a running_mean buffer
    modules = {k.rsplit(".", 1)[0] for k in model_state if k.endswith("running_mean")}
    return {k for k in model_state if k.rsplit(".", 1)[0] in modules}


def test_finetune_changes_only_the_unfrozen_blocks_and_head(toy_root, tmp_path, weights_file):
    before, after, metrics = _finetune(toy_root, tmp_path, weights_file)
    bn = _bn_keys(before)
    lower = [k for k in before if k.startswith("backbone.") and block_of(k) < 3]
    top_conv = [
        k for k in before if k.startswith("backbone.") and block_of(k) >= 3 and k not in bn and k.endswith("weight")
    ]
    top_bn = [k for k in before if k.startswith("backbone.") and block_of(k) >= 3 and k in bn]
    assert lower and top_conv and top_bn
    assert all(torch.equal(before[k], after[k]) for k in lower), "a lower block changed"
    assert all(not torch.equal(before[k], after[k]) for k in top_conv), "an unfrozen conv did not train"
    # train_bn=false: BatchNorm of unfrozen blocks keeps its weights and running statistics
    assert all(torch.equal(before[k], after[k]) for k in top_bn if "num_batches" not in k)
    # trainable-parameter count per epoch: head only during warm-up, then head + top blocks
    counts = [v for _, v in sorted(scalar_tags(run_dir(metrics))["trainable_params"])]
    assert len(counts) == 3 and counts[0] < counts[1] == counts[2]


def test_surgical_finetune_of_the_bottom_block_changes_only_it_and_the_head(toy_root, tmp_path, weights_file):
    """finetune.blocks=bottom:1 (Lee et al.'s surgical fine-tuning of the first block): block 0's
    convolutions and the head change, every other backbone tensor (and frozen BatchNorm) stays."""
    args = _finetune_args(toy_root, tmp_path, weights_file, **{"finetune.blocks": "bottom:1", "optim.lr": "1e-3"})
    before = initial_state(args)
    metrics = run_train(args)
    after = checkpoint_state(run_dir(metrics) / "checkpoints" / "last.ckpt")
    bn = _bn_keys(before)
    changed = {k for k in before if not torch.equal(before[k], after[k]) and "num_batches" not in k}
    backbone_changed = {k for k in changed if k.startswith("backbone.")}
    assert backbone_changed == set(conv_weights(before, 0)) and not backbone_changed & bn
    assert all(k in changed for k in before if k.startswith("head.") and k.endswith("weight"))
    assert metrics["phases"][1]["blocks"] == [0]
    lr_tags = {t for t in scalar_tags(run_dir(metrics)) if t.startswith("lr/")}
    assert lr_tags == {"lr/head", "lr/block0"}


def test_finetune_with_train_bn_updates_only_unfrozen_batchnorm(toy_root, tmp_path, weights_file):
    before, after, _ = _finetune(toy_root, tmp_path, weights_file, **{"finetune.train_bn": "true"})
    stats = [k for k in before if k.endswith("running_mean")]
    lower = [k for k in stats if block_of(k) < 3]
    top = [k for k in stats if block_of(k) >= 3]
    assert all(torch.equal(before[k], after[k]) for k in lower), "frozen BatchNorm statistics moved"
    assert any(not torch.equal(before[k], after[k]) for k in top), "unfrozen BatchNorm did not update"


def test_resume_after_the_unfreeze_keeps_training_the_top_blocks(toy_root, tmp_path, weights_file):
    args = _finetune_args(
        toy_root, tmp_path, weights_file, **{"finetune.unfreeze_blocks": "1", "trainer.max_epochs": "2"}
    )
    first = run_train(args)
    stopped = checkpoint_state(run_dir(first) / "checkpoints" / "last.ckpt")
    resumed = run_train([*args, "ckpt_path=last", "trainer.max_epochs=3"])
    assert resumed["run_dir"] == first["run_dir"]  # continues in its folder
    assert resumed["epochs"] == 3
    after = checkpoint_state(run_dir(resumed) / "checkpoints" / "last.ckpt")
    top = conv_weights(stopped, 4)
    assert top and all(not torch.equal(stopped[k], after[k]) for k in top), "resumed run left the top block frozen"
    steps = sorted(s for s, _ in scalar_tags(run_dir(resumed))["train/loss"])
    assert steps == sorted(set(steps)), "duplicate training steps after resume"
