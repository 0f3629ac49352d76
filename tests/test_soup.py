"""Model soups: a uniform soup of identical runs is the run; greedy soup skips an ingredient that
lowers validation accuracy; the soup is evaluated like a run and read by stage=test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.errors import ConfigError
from pipeline.config.load import load_config
from pipeline.studies.soup import average, check_soup, earlier_soups, greedy, make_soup, take_soup

from conftest import fast_args, finetune_args
from helpers import checkpoint_state, run_train


def test_average_of_identical_states_is_exact_and_of_others_the_mean():
    a = {"w": torch.randn(3, 3), "n": torch.tensor(5)}
    b = {"w": a["w"] + 2.0, "n": torch.tensor(9)}
    assert all(torch.equal(average([a, a])[k], a[k]) for k in a)
    both = average([a, b])
    assert torch.allclose(both["w"], a["w"] + 1.0) and int(both["n"]) == 5  # integers: the first state's


def test_greedy_soup_skips_an_ingredient_that_lowers_validation_accuracy():
    # validation accuracy as a function of the state: the "bad" ingredient drags the mean down
    states = {name: {"w": torch.tensor([value])} for name, value in (("good", 1.0), ("ok", 0.8), ("bad", -3.0))}

    def evaluate(state):  # best at w = 0.9, the mean of "good" and "ok"
        return float(1.0 - abs(0.9 - state["w"].item()) / 10)

    ingredients = [("bad", 0.50, states["bad"]), ("good", 0.95, states["good"]), ("ok", 0.90, states["ok"])]
    kept, soup, accuracy, steps = greedy(ingredients, evaluate)
    assert kept == ["good", "ok"]  # sorted by validation accuracy, "bad" left out
    assert [(t["add"], t["kept"]) for t in steps] == [("good", True), ("ok", True), ("bad", False)]
    assert steps[-1]["val_acc"] < steps[-2]["val_acc"]  # why "bad" was left out: it lowered validation accuracy
    assert soup["w"].item() == pytest.approx(0.9) and accuracy == pytest.approx(evaluate({"w": torch.tensor([0.9])}))


def test_a_soup_needs_seeds_around_fine_tunes_from_one_start(tmp_path):
    assert take_soup(["stage=finetune", "soup=greedy"]) == ("greedy", ["stage=finetune"])
    with pytest.raises(ConfigError, match="choose one of: uniform, greedy"):
        take_soup(["soup=mean"])
    cfg = load_config(fast_args(tmp_path, tmp_path, stage="finetune"))
    with pytest.raises(ConfigError, match="at least two seeds"):
        check_soup(cfg, [1], {})
    with pytest.raises(ConfigError, match="finetune.init_ckpt"):
        check_soup(cfg, [1, 2], {})


def test_a_uniform_soup_of_one_run_twice_is_that_run(toy_root, tmp_path):
    frozen = run_train(fast_args(toy_root, tmp_path / "frozen", stage="frozen", **{"trainer.max_epochs": "1"}))
    args = finetune_args(toy_root, tmp_path / "ft", **{"finetune.init_ckpt": frozen["best_ckpt"]})
    run = run_train(args)
    row = {"cell": "cell000", "status": "ok", "run_dir": run["run_dir"], "val": run["val"]}
    soup = make_soup("uniform", [a for a in args if not a.startswith("out_dir=")], [row, dict(row)], tmp_path)
    assert soup["val"]["acc"] == pytest.approx(run["val"]["acc"]) and soup["test"]["acc"] == run["test"]["acc"]
    stored = checkpoint_state(Path(soup["run_dir"]) / "soup.ckpt")
    original = checkpoint_state(Path(run["best_ckpt"]))
    assert all(torch.equal(stored[k], original[k]) for k in original if k != "temperature")
    assert json.loads((Path(soup["run_dir"]) / "metrics.json").read_text())["ingredients"] == ["cell000", "cell000"]
    tested = run_train(
        fast_args(toy_root, tmp_path / "t", stage="test", ckpt_path=str(Path(soup["run_dir"]) / "soup.ckpt"))
    )
    assert tested["test"]["acc"] == pytest.approx(soup["test"]["acc"])
    # a later command on the same sweep (soup=greedy) keeps the uniform soup's row in the summary
    greedy_row = make_soup("greedy", [a for a in args if not a.startswith("out_dir=")], [row, dict(row)], tmp_path)
    assert [r["cell"] for r in earlier_soups(tmp_path, "greedy")] == ["soup-uniform"]
    assert earlier_soups(tmp_path, "greedy")[0]["val"] == soup["val"]
    assert [r["cell"] for r in earlier_soups(tmp_path, "uniform")] == [greedy_row["cell"]] == ["soup-greedy"]
