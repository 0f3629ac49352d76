"""Repeats over seeds, sweeps over any key, nested training subsets."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

import pipeline.studies.repeats as repeats
from core.errors import ConfigError, RunInterrupted
from datamodules.data_index import scan_splits
from datamodules.layout import DataLayoutError
from datamodules.subsets import train_subset
from pipeline.studies.repeats import parse_grid

from conftest import fast_args
from helpers import run_train


def test_train_subsets_are_nested_seeded_and_leave_evaluation_whole(toy_root):
    index = scan_splits(toy_root)
    small, large = train_subset(index, 5, seed=3), train_subset(index, 10, seed=3)
    for subset, n in ((small, 5), (large, 10)):
        labels = [label for _, label in subset.samples["train"]]
        assert labels.count(0) == n and labels.count(1) == n
        assert subset.samples["val"] == index.samples["val"] and subset.samples["test"] == index.samples["test"]
    assert set(small.samples["train"]) < set(large.samples["train"])
    assert train_subset(index, 5, seed=3).samples == small.samples  # reproducible
    assert train_subset(index, 5, seed=4).samples["train"] != small.samples["train"]
    with pytest.raises(DataLayoutError, match="has only 24 readable training images"):
        train_subset(index, 25, seed=3)


def test_grid_arguments_are_checked():
    base, seeds, grid = parse_grid(["stage=features", "seeds=[1,2]", "sweep.model.backbone=[resnet18,vgg16]"])
    assert base == ["stage=features"] and seeds == [1, 2] and grid == {"model.backbone": ["resnet18", "vgg16"]}
    for argv, message in (
        (["seeds=3"], "non-empty list"),
        (["seeds=[1,1]"], "repeats"),
        (["seeds=[1]", "seed=2"], "not both"),
        (["sweep.optim.lr=0.1"], "non-empty list"),
        (["sweep.optim.lr=[0.1]", "optim.lr=0.2"], "both swept and set"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_grid(argv)


def test_a_bad_sweep_value_is_refused_before_any_run(toy_root, tmp_path, capsys):
    import train

    with pytest.raises(SystemExit):
        train.main(fast_args(toy_root, tmp_path, stage="features", **{"sweep.data.augment": "[none,sideways]"}))
    assert "data.augment='sideways' is not valid" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists() or not any((tmp_path / "sweeps").rglob("metrics.json"))


def test_seeds_and_sweep_summary_and_resume(toy_root, tmp_path, monkeypatch, capsys):
    args = fast_args(
        toy_root,
        tmp_path,
        stage="features",
        seeds="[1,2]",
        **{"sweep.data.train_per_class": "[6,12,1000]", "trainer.max_epochs": "2"},
    )
    real_run_stage, calls = repeats.run_stage, []

    def interrupted_on_the_third(cfg, run_name=None):
        calls.append(cfg.seed)
        if len(calls) == 3:
            raise RunInterrupted("SIGINT: stopped", 130)
        return real_run_stage(cfg, run_name)

    monkeypatch.setattr(repeats, "run_stage", interrupted_on_the_third)
    with pytest.raises(SystemExit):
        run_train(args)
    parent = next((tmp_path / "sweeps").iterdir())
    finished = sorted(parent.glob("cell*/result.json"))
    assert len(finished) == 2
    stamps = {p: p.stat().st_mtime_ns for p in finished}

    monkeypatch.setattr(repeats, "run_stage", real_run_stage)
    capsys.readouterr()
    result = run_train(args)
    out = capsys.readouterr().out
    assert out.count("finished before; not run again") == 2
    assert {p: p.stat().st_mtime_ns for p in finished} == stamps  # not redone

    rows = result["rows"]
    assert len(rows) == 6 and [r["seed"] for r in rows] == [1, 2] * 3
    failed = [r for r in rows if r["status"] != "ok"]
    assert [r["params"]["data.train_per_class"] for r in failed] == [1000, 1000]
    assert "has only 24 readable training images" in failed[0]["error"]
    groups = {g["params"]["data.train_per_class"]: g for g in result["groups"]}
    for n in (6, 12):
        accs = [r["test"]["acc"] for r in rows if r["params"]["data.train_per_class"] == n]
        stats = groups[n]["test"]["acc"]
        assert stats["mean"] == pytest.approx(statistics.mean(accs))
        assert stats["sd"] == pytest.approx(statistics.stdev(accs))
        low, high = stats["ci95"]
        assert low <= stats["mean"] <= high
    assert groups[1000]["failed"] == 2 and groups[1000]["test"] == {}
    assert json.loads((parent / "summary.json").read_text())["rows"] == rows
    summary = (parent / "summary.md").read_text()
    assert "data.train_per_class=12" in summary and "DataLayoutError" in summary
    assert any((parent / "hparams").rglob("events.out.tfevents.*"))
    # each run trained on its subset: 2 classes x N images
    for r in rows:
        if r["status"] == "ok":
            epochs = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
            assert epochs["epochs"] == 2


def test_folds_are_summarised_like_seeds():
    from pipeline.studies.repeats import summarise_rows

    def row(fold: int, backbone: str, acc: float) -> dict:
        metrics = {"acc": acc, "loss": 1 - acc}
        params = {"model.backbone": backbone, "data.fold": fold}
        return {"params": params, "method": None, "status": "ok", "val": metrics, "test": metrics}

    rows = [row(f, b, 0.8 + 0.01 * f + (0.1 if b == "b" else 0)) for b in ("a", "b") for f in range(3)]
    groups = summarise_rows(rows)
    assert [g["params"] for g in groups] == [{"model.backbone": "a"}, {"model.backbone": "b"}]
    assert groups[0]["runs"] == 3 and groups[0]["test"]["acc"]["mean"] == pytest.approx(0.81)
    assert groups[1]["test"]["acc"]["sd"] == pytest.approx(0.01)


def test_seeds_around_stage_all_summarise_each_method(toy_root, tmp_path):
    result = run_train(fast_args(toy_root, tmp_path, stage="all", seeds="[1,2]", **{"all.epochs": "[1,1,1]"}))
    rows = result["rows"]
    assert [(r["seed"], r["method"].split(".")[0]) for r in rows] == [
        (seed, m) for seed in (1, 2) for m in ("1", "2", "3")
    ]
    assert all(r["status"] == "ok" and r["test"]["count"] == 16 for r in rows)
    groups = result["groups"]
    assert len(groups) == 3 and all(g["runs"] == 2 for g in groups)
    frozen = [r["test"]["acc"] for r in rows if r["method"].startswith("2.")]
    assert groups[1]["test"]["acc"]["mean"] == pytest.approx(statistics.mean(frozen))
