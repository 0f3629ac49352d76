"""Class imbalance: counts and a warning, class weights in the loss, a balanced sampler."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from datamodules.class_balance import describe_counts, resolve_class_weights
from datamodules.data_index import scan_splits
from datamodules.sampling import BalancedEpochSampler, train_sampler
from lightning_modules.classifier import TransferClassifier

from conftest import BACKBONE, fast_args
from helpers import checkpoint_state, run_dir, run_train
from toy_data import make_image_tree


def _model(classes: list[str], weights: list[float] | None) -> TransferClassifier:
    return TransferClassifier(
        backbone=BACKBONE, class_names=classes, image_size=32,
        head={"pool": "avg", "hidden": 8, "dropout": 0.0}, optim_name="adam", weight_decay=0.0,
        decay_norm_and_bias=False, train_bn=False, tta_flip=False,
        label_smoothing=0.0, class_weights=weights,
    )  # fmt: skip


def test_class_weights_change_the_training_loss_as_computed_by_hand():
    g = torch.Generator().manual_seed(0)
    model = _model(["a", "b"], [0.25, 3.0]).train()
    logits, target = torch.randn(6, 1, generator=g), torch.tensor([0, 1, 1, 0, 0, 1])
    per_image = F.binary_cross_entropy_with_logits(logits.squeeze(1), target.float(), reduction="none")
    w = torch.tensor([0.25, 3.0])[target]
    assert float(model._loss(logits, target)) == pytest.approx(float((per_image * w).sum() / w.sum()))
    assert float(model.eval()._loss(logits, target)) == pytest.approx(float(per_image.mean()))  # evaluation: unweighted

    model = _model(["a", "b", "c"], [1.0, 2.0, 4.0]).train()
    logits, target = torch.randn(5, 3, generator=g), torch.tensor([0, 2, 1, 2, 2])
    per_image = F.cross_entropy(logits, target, reduction="none")
    w = torch.tensor([1.0, 2.0, 4.0])[target]
    assert float(model._loss(logits, target)) == pytest.approx(float((per_image * w).sum() / w.sum()))


def test_auto_weights_and_bad_weights():
    assert resolve_class_weights("auto", [90, 10], ["a", "b"]) == pytest.approx([100 / 180, 100 / 20])
    assert resolve_class_weights(None, [90, 10], ["a", "b"]) is None
    with pytest.raises(ValueError, match="2 positive weights"):
        resolve_class_weights([1, 2, 3], [90, 10], ["a", "b"])
    with pytest.raises(ValueError, match="2 positive weights"):
        resolve_class_weights([1, -2], [90, 10], ["a", "b"])


@pytest.fixture(scope="module")
def skewed_root(tmp_path_factory):
    return make_image_tree(
        tmp_path_factory.mktemp("skewed"), per_class={"train": 20, "validation": 4, "test": 4}, size=32
    )


def test_rare_classes_are_counted_and_warned(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class={"train": 20, "validation": 2, "test": 2}, size=16)
    for path in sorted((root / "train" / "dogs").iterdir())[2:]:
        path.unlink()
    line, warnings = describe_counts(scan_splits(root))
    assert line == "images per class (train/val/test): cats 20/2/2, dogs 2/2/2"
    assert len(warnings) == 1 and "1 of 2 classes" in warnings[0] and "'dogs' 2 (9.1%)" in warnings[0]


def _labels(n0: int, n1: int) -> TensorDataset:
    return TensorDataset(torch.zeros(n0 + n1, 2), torch.tensor([0] * n0 + [1] * n1))


def test_the_balanced_sampler_draws_classes_evenly_and_reproducibly():
    data = _labels(90, 10)
    sampler = BalancedEpochSampler(data, [0] * 90 + [1] * 10, num_replicas=1, rank=0, seed=3, shuffle=True)
    counts = Counter()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        counts.update(int(data.tensors[1][i]) for _, i in sampler)
    assert abs(counts[1] / (counts[0] + counts[1]) - 0.5) < 0.05  # 10% of the images, half of the draws
    sampler.set_epoch(4)
    first = list(sampler)
    assert list(sampler) == first and len(first) == 100
    # resume inside the epoch: the rest of the same sequence
    sampler.skip(4, 37)
    assert list(sampler) == first[37:]
    # two ranks: each takes every second draw of the same sequence
    shards = []
    for rank in (0, 1):
        s = BalancedEpochSampler(data, [0] * 90 + [1] * 10, num_replicas=2, rank=rank, seed=3, shuffle=True)
        s.set_epoch(4)
        shards.append(list(s))
    assert [x for pair in zip(*shards) for x in pair] == first


def test_balanced_cached_features_sampler_yields_plain_indices():
    sampler = train_sampler(_labels(30, 6), None, seed=1, with_epoch=False, balanced=True)
    indices = list(sampler)
    assert len(indices) == 36 and all(isinstance(i, int) for i in indices)


def test_a_balanced_weighted_run_resumes_exactly(skewed_root, tmp_path):
    for path in sorted((skewed_root / "train" / "dogs").iterdir())[5:]:
        path.unlink()  # 20 cats, 5 dogs
    extra = {
        "stage": "finetune",
        "finetune.warmup_epochs": "1",
        "finetune.unfreeze_blocks": "1",
        "data.balanced_sampler": "true",
        "optim.class_weights": "auto",
        "trainer.deterministic": "true",
        "trainer.max_epochs": "3",
    }
    whole = run_train(fast_args(skewed_root, tmp_path / "whole", **extra))
    run_train(fast_args(skewed_root, tmp_path / "split", **(extra | {"trainer.max_epochs": "2"})))
    resumed = run_train([*fast_args(skewed_root, tmp_path / "split", **extra), "ckpt_path=last"])
    a = checkpoint_state(run_dir(whole) / "checkpoints" / "last.ckpt")
    b = checkpoint_state(run_dir(resumed) / "checkpoints" / "last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    hparams = torch.load(run_dir(whole) / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["class_weights"] == pytest.approx([25 / 40, 25 / 10])
