"""plan.png is drawn from the plan itself: its curves are Plan's rates, only while a group trains."""

from __future__ import annotations

import pytest
from PIL import Image

from lightning_modules.plan_figure import plan_curves, plan_figure, trains
from lightning_modules.schedule import build_plan

from conftest import fast_args
from helpers import image_counts, run_dir, run_train


@pytest.fixture
def plan():
    return build_plan(
        "finetune",
        6,
        5,
        1e-3,
        milestones=[(0, 0), (2, 1), (4, 2)],
        backbone_lr_ratio=0.1,
        layer_decay=0.5,
        scheduler="cosine",
        lr_warmup_epochs=1,
    )


def test_the_plotted_points_are_the_plans_rates(plan):
    curves = plan_curves(plan, points_per_epoch=10)
    assert set(curves) == {"head", "block4", "block3"}
    for group, points in curves.items():
        assert [t for t, _ in points] == pytest.approx([i / 10 for i in range(61)])
        for t, lr in points:
            phase = plan.phases[plan.phase_index(min(int(t), 5))]
            if trains(plan, group, phase):
                assert lr == pytest.approx(plan.peak_lr(group) * plan.factor(t))
            else:
                assert lr is None
    head = dict(curves["head"])
    assert head[0.0] == 0 and head[1.0] == pytest.approx(1e-3) and head[6.0] == pytest.approx(0, abs=1e-12)
    assert head[0.5] == pytest.approx(5e-4)  # linear warm-up
    # a training step's rate is the curve at the step's middle (one step per epoch: step 4 -> 4.5)
    assert dict(curves["block3"])[4.5] == pytest.approx(plan.lr("block3", 4, 1))
    assert [t for t, lr in curves["block4"] if lr is not None][0] == 2.0
    assert [t for t, lr in curves["block3"] if lr is not None][0] == 4.0
    assert dict(plan.groups)["block3"] == pytest.approx(1e-3 * 0.1 * 0.5)


def test_the_figure_shades_each_phase(plan):
    image = plan_figure(plan)
    assert image.size == (720, 360)
    colours = {image.getpixel((x, 200)) for x in range(75, 560, 5)}
    assert len({c for c in colours if c[2] == 255 and c[0] == c[1]}) == 3  # three phases, three shades


def test_every_training_run_writes_its_plan(toy_root, tmp_path):
    metrics = run_train(fast_args(toy_root, tmp_path, stage="finetune", **{"trainer.max_epochs": "2"}))
    folder = run_dir(metrics)
    with Image.open(folder / "plan.png") as image:
        assert image.size == (720, 360)
    assert image_counts(folder).get("plan") == 1


def test_a_surgical_plan_draws_only_its_blocks():
    plan = build_plan("finetune", 3, 5, 1e-3, milestones=[(0, 0), (1, 1)], blocks=(0,))
    curves = plan_curves(plan, points_per_epoch=2)
    assert set(curves) == {"head", "block0"}
    assert [lr is not None for _, lr in curves["block0"]] == [False, False, True, True, True, True, True]
    assert plan_figure(plan).size == (720, 360)
