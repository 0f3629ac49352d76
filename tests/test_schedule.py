"""The staged schedule as one plan: its values, and that runs execute exactly those values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

import train
from core.errors import ConfigError
from lightning_modules.freeze_schedule import ApplyPlan
from lightning_modules.schedule import Phase, Plan, PlanError, build_plan, milestones_from, param_groups, parse_blocks
from pipeline.config.load import load_config, plan_from_config

from conftest import fast_args
from helpers import checkpoint_state, conv_weights, read_metrics, run_dir, run_train, scalar_tags, sigterm_at_step
from toy_data import make_image_tree

STEPS_PER_EPOCH = 6  # toy data: 48 training images, batch 8


def _finetune_plan(**kw) -> Plan:
    args = {"milestones": milestones_from(1, 2, None), "backbone_lr_ratio": 0.1, "layer_decay": 0.5} | kw
    return build_plan("finetune", 4, 5, 1e-3, **args)


# --- the plan as a value -------------------------------------------------------------------------


def test_finetune_plan_reads_like_its_config():
    plan = _finetune_plan()
    assert plan.phases == (Phase(0, 1, 0), Phase(1, 4, 2))
    # block k from the top: lr * ratio * decay**k; blocks the plan never trains have no group
    assert dict(plan.groups) == pytest.approx({"head": 1e-3, "block4": 1e-4, "block3": 5e-5})
    assert plan.block_group(2) is None and plan.block_group(3) == "block3"
    assert "phase 1: epochs 1-3: top 2 of 5 blocks train" in plan.describe()
    frozen = build_plan("frozen", 3, 5, 2e-5)
    assert frozen.phases == (Phase(0, 3, 0),) and frozen.groups == (("head", 2e-5),)


def test_milestones_give_gradual_phases():
    # the shorthand is ignored when milestones are given; an implicit [0, 0] comes first
    plan = build_plan("finetune", 8, 5, 1e-3, milestones=milestones_from(9, 9, [[2, 1], [5, 3]]))
    assert plan.phases == (Phase(0, 2, 0), Phase(2, 5, 1), Phase(5, 8, 3))
    assert [name for name, _ in plan.groups] == ["head", "block4", "block3", "block2"]


def test_cosine_anneals_once_across_phases_and_is_never_zero_where_something_trains():
    plan = _finetune_plan(scheduler="cosine")
    rates = [plan.lr("head", s, 10) for s in range(40)]
    assert all(a > b for a, b in zip(rates, rates[1:])), "cosine must fall monotonically across the unfreeze"
    assert rates[10] == pytest.approx(1e-3 * (1 + math.cos(math.pi * 10.5 / 40)) / 2)
    assert min(rates) > 0


def test_warmup_is_linear_from_above_zero():
    plan = _finetune_plan(scheduler="cosine", lr_warmup_epochs=0.5)
    rates = [plan.lr("head", s, 10) for s in range(6)]
    assert rates[:5] == pytest.approx([1e-3 * (s + 0.5) / 5 for s in range(5)])
    assert rates[5] == pytest.approx(1e-3 * (1 + math.cos(math.pi * 0.05 / 3.5)) / 2)


def test_onecycle_restarts_in_every_phase():
    plan = _finetune_plan(scheduler="onecycle")
    factors = [plan.factor((s + 0.5) / 100) for s in range(400)]
    # phase 0 is epoch 0, phase 1 epochs 1-3: each starts near lr/25, peaks, then anneals
    for start, end in ((0, 100), (100, 400)):
        phase = factors[start:end]
        assert 1 / 25 < phase[0] < 1.05 / 25
        assert max(phase) == pytest.approx(1.0, rel=1e-3) and phase[-1] < 1e-3
        peak = phase.index(max(phase))
        assert abs(peak - 0.25 * (end - start)) <= 1


def test_none_is_flat():
    plan = _finetune_plan()
    assert {plan.lr("block3", s, 7) for s in range(28)} == {5e-5}


def test_stop_early_moves_later_phases_up_and_replays():
    plan = build_plan("finetune", 10, 5, 1e-3, milestones=[(0, 0), (4, 1), (7, 2)], scheduler="cosine")
    stopped = plan.stop_early(0, 2)
    assert stopped.phases == (Phase(0, 2, 0), Phase(2, 5, 1), Phase(5, 8, 2))
    assert stopped.early_stops == ((0, 2),) and stopped.epochs == 8
    assert plan.replay([[0, 2]]) == stopped
    assert Plan.from_dict(stopped.to_dict()) == stopped


def test_norm_weights_and_biases_get_no_weight_decay():
    net = torchvision.models.resnet18()
    blocks = torch.nn.ModuleList([torch.nn.Sequential(net.conv1, net.bn1), net.layer1, net.layer4])
    head = torch.nn.Linear(512, 1)
    plan = build_plan("finetune", 2, 3, 1e-3, milestones=[(0, 1)])
    groups = param_groups(head, blocks, plan, weight_decay=0.05)
    assert [(g["name"], g["weight_decay"]) for g in groups] == [
        ("head", 0.05),
        ("head", 0.0),
        ("block2", 0.05),
        ("block2", 0.0),
    ]
    assert all(p.ndim <= 1 for g in groups if g["weight_decay"] == 0 for p in g["params"])
    assert all(p.ndim > 1 for g in groups if g["weight_decay"] > 0 for p in g["params"])
    together = param_groups(head, blocks, plan, weight_decay=0.05, decay_norm_and_bias=True)
    assert [g["weight_decay"] for g in together] == [0.05, 0.05]
    assert sum(len(g["params"]) for g in together) == sum(len(g["params"]) for g in groups)


# --- nonsense is refused before any work -----------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["trainer.max_epochs=0"], "trainer.max_epochs must be a whole number of at least 1"),
        (["trainer.max_epochs=-28"], "trainer.max_epochs must be a whole number of at least 1"),
        (["finetune.warmup_epochs=3"], "an unfreeze at epoch 3 never happens with trainer.max_epochs=3"),
        (["finetune.milestones=[[0,0],[3,1]]"], "never happens with trainer.max_epochs=3"),
        (["finetune.milestones=[[0,0],[2,1],[1,2]]"], "finetune.milestones must have increasing epochs"),
        (["finetune.milestones=[[0,2],[1,1]]"], "must not freeze blocks again"),
        (["finetune.milestones=[[0,0],[1,6]]"], "cannot train the top 6 blocks: the backbone has 5"),
        (["finetune.unfreeze_blocks=0"], "never unfreezes a block"),
        (["finetune.layer_decay=0"], "finetune.layer_decay must be in (0, 1]"),
        (["optim.scheduler=step"], "optim.scheduler='step' is not valid; choose one of: none, cosine, onecycle"),
        (["optim.scheduler=onecycle", "optim.lr_warmup_epochs=1"], "shorter than every phase"),
        (["optim.lr_warmup_epochs=3"], "must be shorter than trainer.max_epochs=3"),
        (["trainer.max_steps=10"], "trainer.max_steps is not supported"),
        (["early_stop.monitor=val/precision"], "early_stop.monitor='val/precision' is not valid"),
        (["stage=all", "all.epochs=[2,0,2]"], "all.epochs must be three epoch counts of at least 1"),
        (["stage=all", "finetune.milestones=[[0,1],[2,2]]", "trainer.max_epochs=2"], "never happens"),
        (["finetune.milestones=[[1]]"], "finetune.milestones must be a non-empty list of [epoch, top_blocks] pairs"),
        (["finetune.milestones=[]"], "finetune.milestones must be a non-empty list"),
        (["finetune.milestones=[[-1,0],[1,1]]"], "pairs of whole numbers >= 0"),
        (["optim.label_smoothing=1.5"], "optim.label_smoothing must be in [0, 1)"),
        (["optim.lr=nan"], "optim.lr must be a finite number"),
        (["finetune.backbone_lr_ratio=inf"], "finetune.backbone_lr_ratio must be a finite number"),
        (["trainer.fast_dev_run=true"], "trainer.fast_dev_run is not supported"),
        (["trainer.limit_train_batches=0"], "would train nothing"),
        (["early_stop.patience=2", "trainer.check_val_every_n_epoch=2"], "needs one validation per epoch"),
        (["early_stop.patience=2", "trainer.limit_val_batches=0"], "early_stop.patience needs validation"),
        (["finetune.milestones=[[0,0],[1,1]]", "finetune.warmup_epochs=1"], "give either finetune.milestones or"),
    ],
)
def test_nonsense_schedules_are_one_line_and_write_nothing(capsys, toy_root, tmp_path, extra, expected):
    out = tmp_path / "out"
    args = fast_args(toy_root, out, stage="finetune") + extra
    if any(e.startswith("finetune.milestones") for e in extra):  # not the warm-up fast_args adds
        args = [a for a in args if not a.startswith("finetune.warmup_epochs")] + extra
    with pytest.raises(SystemExit) as exc:
        train.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not out.exists()


# --- runs execute the plan -------------------------------------------------------------------------


def _rate_args(toy_root: Path, out: Path, scheduler: str, **extra: str) -> list[str]:
    settings = {
        "optim.scheduler": scheduler,
        "optim.name": "adamw",
        "optim.weight_decay": "0.01",
        "finetune.warmup_epochs": "1",
        "finetune.unfreeze_blocks": "2",
        "finetune.backbone_lr_ratio": "0.1",
        "finetune.layer_decay": "0.5",
        "trainer.max_epochs": "3",
    }
    return fast_args(toy_root, out, stage="finetune", **settings | extra)


def _assert_logged_rates_follow(folder: Path, plan: Plan, steps: int) -> None:
    scalars = scalar_tags(folder)
    for group, _ in plan.groups:
        logged = dict(scalars[f"lr/{group}"])
        assert sorted(logged) == list(range(steps)), f"lr/{group} not logged at every step"
        expected = [plan.lr(group, s, STEPS_PER_EPOCH) for s in range(steps)]
        assert [logged[s] for s in range(steps)] == pytest.approx(expected, rel=1e-5), group


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle", "none"])
def test_logged_rates_equal_the_plan_at_every_step(toy_root, tmp_path, scheduler):
    args = _rate_args(toy_root, tmp_path, scheduler)
    metrics = run_train(args)
    plan = plan_from_config(load_config(args))
    assert [name for name, _ in plan.groups] == ["head", "block4", "block3"]
    _assert_logged_rates_follow(run_dir(metrics), plan, 3 * STEPS_PER_EPOCH)
    assert "plan:" in (run_dir(metrics) / "config.yaml").read_text()
    saved = torch.load(run_dir(metrics) / "checkpoints" / "last.ckpt", weights_only=True)["plan"]
    assert Plan.from_dict(saved) == plan


@pytest.mark.parametrize("stop_at", [3, 9])  # inside the head warm-up, and after the unfreeze
def test_rates_and_weights_are_unchanged_by_an_interrupt(toy_root, tmp_path, monkeypatch, stop_at, uninterrupted):
    extra = {"optim.lr_warmup_epochs": "0.5"}
    whole = uninterrupted(lambda out: _rate_args(toy_root, out, "cosine", **extra))  # one run for both stops
    sigterm_at_step(monkeypatch, stop_at)
    args = _rate_args(toy_root, tmp_path / "split", "cosine", **extra)
    with pytest.raises(SystemExit):
        train.main(args)
    monkeypatch.undo()
    resumed = run_train([*args, "ckpt_path=last"])
    _assert_logged_rates_follow(run_dir(resumed), plan_from_config(load_config(args)), 3 * STEPS_PER_EPOCH)
    a = checkpoint_state(run_dir(whole) / "checkpoints" / "last.ckpt")
    b = checkpoint_state(run_dir(resumed) / "checkpoints" / "last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run's weights differ"


def _record_phases(monkeypatch) -> dict[str, dict]:
    """The model's state at the start and end of every phase's fit, and at each start the global
    step and the optimizer's step count of the head's first tensor (0 if the fit started afresh)."""
    seen: dict[str, dict] = {"start": {}, "end": {}, "resumed_at": {}}

    def snapshot(module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    original_start = ApplyPlan.on_train_start

    def on_train_start(self, trainer, pl_module):
        seen["start"][self.index] = snapshot(pl_module)
        state = trainer.optimizers[0].state_dict()["state"]
        seen["resumed_at"][self.index] = (trainer.global_step, int(state[0]["step"]) if 0 in state else 0)
        return original_start(self, trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        seen["end"][self.index] = snapshot(pl_module)

    monkeypatch.setattr(ApplyPlan, "on_train_start", on_train_start)
    monkeypatch.setattr(ApplyPlan, "on_train_end", on_train_end, raising=False)
    return seen


def _changed(a: dict, b: dict, block: int, bn_stats: bool = False) -> list[bool]:
    prefix = f"backbone.blocks.{block}."
    keys = [k for k in a if k.startswith(prefix) and ("running_" in k) == bn_stats and "num_batches" not in k]
    assert keys
    return [not torch.equal(a[k], b[k]) for k in keys]


def test_milestones_unfreeze_exactly_the_named_blocks(toy_root, tmp_path, weights_file, monkeypatch):
    seen = _record_phases(monkeypatch)
    args = fast_args(
        toy_root,
        tmp_path,
        stage="finetune",
        **{
            "model.weights": str(weights_file),
            "finetune.milestones": "[[0,0],[1,1],[2,3]]",
            "optim.lr": "1e-3",
        },
    )
    metrics = run_train(args)
    assert [p["top_blocks"] for p in metrics["phases"]] == [0, 1, 3]
    start, end = seen["start"], seen["end"]
    for index, top in enumerate((0, 1, 3)):
        for block in range(5):
            convs = _changed(start[index], end[index], block)
            stats = _changed(start[index], end[index], block, bn_stats=True)
            if block >= 5 - top:
                assert any(convs), f"phase {index}: block {block} did not train"
                assert not any(stats), f"phase {index}: frozen BatchNorm statistics of block {block} moved"
            else:
                assert not any(convs) and not any(stats), f"phase {index}: block {block} changed"
    # the next phase starts exactly where the previous one ended: weights, step and optimizer state
    for index in (1, 2):
        assert all(torch.equal(end[index - 1][k], start[index][k]) for k in start[index])
    assert seen["resumed_at"] == {0: (0, 0), 1: (6, 6), 2: (12, 12)}
    counts = [v for _, v in sorted(scalar_tags(run_dir(metrics))["trainable_params"])]
    assert counts[0] < counts[1] < counts[2]


@pytest.mark.parametrize("extra", [{"trainer.check_val_every_n_epoch": "2"}, {"trainer.enable_checkpointing": "false"}])
def test_phase_hand_over_does_not_depend_on_trainer_settings(toy_root, tmp_path, weights_file, monkeypatch, extra):
    seen = _record_phases(monkeypatch)
    args = fast_args(
        toy_root,
        tmp_path,
        stage="finetune",
        **{"model.weights": str(weights_file), "finetune.warmup_epochs": "1", "optim.lr": "1e-3"} | extra,
    )
    metrics = run_train(args)
    assert metrics["epochs"] == 3 and metrics["test"]["count"] == 16
    assert all(torch.equal(seen["end"][0][k], seen["start"][1][k]) for k in seen["start"][1])
    assert seen["resumed_at"][1] == (6, 6)  # the hand-over checkpoint was restored
    assert any(_changed(seen["start"][1], seen["end"][1], 4)), "the unfrozen block did not train"
    if "trainer.enable_checkpointing" in extra:
        assert metrics["best_ckpt"] is None
        assert [p.name for p in (run_dir(metrics) / "checkpoints").iterdir()] == ["last.ckpt"]


def test_stage_all_max_epochs_means_every_method(toy_root, tmp_path):
    result = run_train(fast_args(toy_root, tmp_path, stage="all", **{"trainer.max_epochs": "2"}))
    methods = result["methods"]
    assert [m["epochs"] for m in methods] == [2, 2, 2]
    finetune = methods[2]
    assert [p["top_blocks"] for p in finetune["phases"]] == [1]  # all its epochs fine-tune
    frozen = checkpoint_state(Path(methods[1]["best_ckpt"]))
    tuned = checkpoint_state(Path(finetune["run_dir"]) / "checkpoints" / "last.ckpt")
    top = conv_weights(frozen, 4)
    assert top and all(not torch.equal(frozen[k], tuned[k]) for k in top), "fine-tuning changed nothing"
    assert "| 2 |" in (Path(result["run_dir"]) / "comparison.md").read_text()


def test_early_stopping_ends_a_phase_and_the_next_starts_from_its_best(tmp_path, monkeypatch):
    root = _swapped_validation(tmp_path / "swapped")
    epoch_ends = _record_epoch_ends(monkeypatch)
    seen = _record_phases(monkeypatch)
    args = _early_stop_args(root, tmp_path / "out")
    metrics = run_train(args)
    first = metrics["phases"][0]
    assert first["stopped_early_at_epoch"] == 1 and first["best_epoch"] == 0, metrics["phases"]
    assert metrics["phases"][1]["epochs"] == [2, 4]  # moved up by the two epochs skipped
    assert metrics["epochs"] == 4
    # phase 1 started from phase 0's best weights (epoch 0), not from where it stopped (epoch 1)
    best, stopped, start = epoch_ends[0], epoch_ends[1], seen["start"][1]
    head = [k for k in best if k.startswith("head.")]
    assert any(not torch.equal(best[k], stopped[k]) for k in head)
    assert all(torch.equal(best[k], start[k]) for k in best)
    assert read_metrics(run_dir(metrics))["phases"][0]["stopped_early_at_epoch"] == 1
    saved = torch.load(run_dir(metrics) / "checkpoints" / "last.ckpt", weights_only=True)["plan"]
    assert saved["early_stops"][0] == [0, 2]


def _early_stop_args(root: Path, out: Path) -> list[str]:
    """Phase 0 of 4 epochs, phase 1 of 2, patience 1 on the validation loss (see ``_swapped_validation``)."""
    settings = {
        "finetune.milestones": "[[0,0],[4,1]]",
        "trainer.max_epochs": "6",
        "early_stop.patience": "1",
        "early_stop.monitor": "val/loss",
    }
    return fast_args(root, out, stage="finetune", **settings)


def _record_epoch_ends(monkeypatch) -> dict[int, dict[str, torch.Tensor]]:
    """The model's state at the end of every training epoch."""
    epoch_ends: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_end(self, trainer, pl_module):
        epoch_ends[trainer.current_epoch] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    monkeypatch.setattr(ApplyPlan, "on_train_epoch_end", on_train_epoch_end, raising=False)
    return epoch_ends


def _swapped_validation(root_dir: Path) -> Path:
    """Toy data whose validation labels are swapped: the better the model learns, the worse
    validation gets, so the first epoch of each phase is its best (early stopping, patience 1). By
    the loss: the toy model has every validation image wrong after one epoch, so the accuracy
    stays at 0 and a one-image blip would count as an improvement; the loss rises every epoch."""
    root = make_image_tree(root_dir, size=32)
    val = root / "validation"
    (val / "cats").rename(val / "tmp")
    (val / "dogs").rename(val / "cats")
    (val / "tmp").rename(val / "dogs")
    return root


def test_early_stopped_phase_resumed_mid_way_still_hands_over_its_best(tmp_path, monkeypatch):
    from lightning_modules.run_safety import StepSeed

    root = _swapped_validation(tmp_path / "swapped")
    epoch_ends = _record_epoch_ends(monkeypatch)
    original = StepSeed.on_train_batch_start
    sigterm_at_step(monkeypatch, 9)  # inside epoch 1, after epoch 0 (the phase's best) was saved
    args = _early_stop_args(root, tmp_path / "out")
    with pytest.raises(SystemExit):
        train.main(args)
    monkeypatch.setattr(StepSeed, "on_train_batch_start", original)
    seen = _record_phases(monkeypatch)
    resumed = run_train([*args, "ckpt_path=last"])
    assert resumed["phases"][0] == {
        "phase": 0,
        "epochs": [0, 2],
        "top_blocks": 0,
        "stopped_early_at_epoch": 1,
        "best_epoch": 0,
    }
    assert all(torch.equal(epoch_ends[0][k], seen["start"][1][k]) for k in epoch_ends[0])
    saved = OmegaConf.load(run_dir(resumed) / "config.yaml")
    assert saved.plan.early_stops[0] == [0, 2] and saved.plan.phases[1] == [2, 4, 1]
    assert not list((run_dir(resumed) / "checkpoints").glob("phase*-best.ckpt"))


def test_resuming_with_another_optimizer_is_refused(capsys, toy_root, tmp_path):
    args = fast_args(toy_root, tmp_path, stage="frozen", **{"trainer.max_epochs": "1"})
    run_train(args)
    with pytest.raises(SystemExit) as exc:
        train.main([*args, "ckpt_path=last", "optim.name=sgd", "trainer.max_epochs=2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained with optim.name=adam, this config has sgd" in err[0]


def test_stage_all_without_checkpointing_fine_tunes_from_the_frozen_runs_end(toy_root, tmp_path):
    result = run_train(
        fast_args(
            toy_root, tmp_path, stage="all", **{"trainer.max_epochs": "1", "trainer.enable_checkpointing": "false"}
        )
    )
    frozen, finetune = result["methods"][1], result["methods"][2]
    assert frozen["best_ckpt"] is None and finetune["epochs"] == 1
    config = OmegaConf.load(Path(finetune["run_dir"]) / "config.yaml")
    assert config.finetune.init_ckpt == str(Path(frozen["run_dir"]) / "checkpoints" / "last.ckpt")


def test_command_line_shorthand_replaces_a_presets_milestones():
    preset = load_config(["model.backbone=efficientnet_lite0", "stage=finetune"])
    assert preset.finetune.milestones is not None  # Lite0's fine-tune preset unfreezes gradually
    mine = load_config(["model.backbone=efficientnet_lite0", "stage=finetune", "finetune.unfreeze_blocks=1"])
    assert mine.finetune.milestones is None
    assert plan_from_config(mine).phases == (Phase(0, 1, 0), Phase(1, 5, 1))


# --- surgical fine-tuning: finetune.blocks -------------------------------------------------------


@pytest.mark.parametrize(
    "value, blocks", [("top:2", (3, 4)), ("bottom:1", (0,)), ([3, 0], (0, 3)), ([4], (4,)), ("top:5", (0, 1, 2, 3, 4))]
)
def test_finetune_blocks_are_any_set_of_blocks(value, blocks):
    assert parse_blocks(value, 5) == blocks


@pytest.mark.parametrize("value", ["top:0", "bottom:6", "middle:1", [5], [], "[0,3]", [True]])
def test_bad_finetune_blocks_are_one_line_naming_the_forms(value):
    with pytest.raises(PlanError, match=r"give top:K or bottom:K \(K in 1\.\.5\) or a list of block indices in 0\.\.4"):
        parse_blocks(value, 5)


def test_a_surgical_plan_trains_only_its_blocks_with_layer_decay_over_them():
    plan = _finetune_plan(milestones=milestones_from(1, 2, None), blocks=(0, 3))
    assert [p.trained(5) for p in plan.phases] == [(), (0, 3)]
    # the k-th trained block from the top at lr * ratio * decay**k: block 3 first, then block 0
    assert dict(plan.groups) == pytest.approx({"head": 1e-3, "block3": 1e-4, "block0": 5e-5})
    assert plan.phase_text(1) == "phase 1: epochs 1-3: blocks 0, 3 of 5 train"
    assert Plan.from_dict(plan.to_dict()) == plan
    # the top blocks given as a set are the plan of finetune.unfreeze_blocks
    assert _finetune_plan(blocks=(3, 4)) == _finetune_plan()


def test_finetune_blocks_from_the_config_and_their_conflicts(toy_root, tmp_path):
    args = fast_args(toy_root, tmp_path, stage="finetune")
    plan = plan_from_config(load_config([*args, "finetune.blocks=[0,4]"]))
    assert plan.phases[-1].trained(5) == (0, 4)
    alias = plan_from_config(load_config([*args, "finetune.unfreeze_blocks=2"]))
    assert alias == plan_from_config(load_config([*args, "finetune.blocks=top:2"]))
    for extra, message in [
        (["finetune.blocks=bottom:1", "finetune.unfreeze_blocks=1"], "give either finetune.blocks or"),
        (["finetune.blocks=bottom:1", "finetune.milestones=[[1,1]]"], "give either finetune.milestones or"),
        (["finetune.blocks=left:1"], "finetune.blocks=left:1 is not valid"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config([*args, *extra])
