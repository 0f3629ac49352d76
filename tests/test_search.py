"""search.<key>=<range>: an Optuna search whose trials are ordinary runs, chosen on validation only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.studies.search import best_row, parse_range, parse_search, redact

from conftest import fast_args
from helpers import error_line, run_train

optuna = pytest.importorskip("optuna", reason="the search needs the [search] extra")


def search_args(root: Path, out: Path, *extra: str) -> list[str]:
    """A toy features search: the head's learning rate on a log scale and two dropouts."""
    args = fast_args(root, out, stage="features", **{"trainer.max_epochs": "2"})
    args = [a for a in args if not a.startswith("optim.lr=")]
    return [*args, "search.optim.lr=log(1e-4,3e-2)", "search.model.dropout=[0.0,0.5]", *extra]


def test_ranges_are_parsed_and_bad_ones_are_one_line():
    assert parse_range("optim.lr", "log(1e-4,1e-1)") == ("log", 1e-4, 1e-1)
    assert parse_range("finetune.unfreeze_blocks", "int(1,4)") == ("int", 1, 4)
    assert parse_range("data.augment", ["seed", "robust"]) == ("choice", ["seed", "robust"])
    bad = {
        "log(1e-1,1e-4)": "is reversed: the low bound comes first, log(1e-4,1e-1)",
        "int(3,3)": "is empty: its bounds are equal",
        "log(0,1)": "log(a,b) needs 0 < a < b",
        "int(1.5,4)": "must be int numbers",
        "between(1,2)": "is not a range",
    }
    for text, message in bad.items():
        with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_range("k", text)
    with pytest.raises(Exception, match="has no choices"):
        parse_range("data.augment", [])
    with pytest.raises(Exception, match="search.trials must be a whole number"):
        parse_search(["search.optim.lr=log(1e-4,1e-1)"])
    with pytest.raises(Exception, match="optim.lr is both searched and set"):
        parse_search(["optim.lr=0.1", "search.optim.lr=log(1e-4,1e-1)", "search.trials=2"])
    assert redact("postgresql://me:secret@db:5432/x") == "postgresql://me:***@db:5432/x"


def test_the_best_trial_is_chosen_on_validation_accuracy_then_loss():
    rows = [
        {"status": "ok", "val": {"acc": 0.9, "loss": 0.2}, "test": {"acc": 1.0}},
        {"status": "ok", "val": {"acc": 0.95, "loss": 0.4}, "test": {"acc": 0.5}},
        {"status": "ok", "val": {"acc": 0.95, "loss": 0.3}, "test": {"acc": 0.6}},
        {"status": "pruned", "val": None, "test": None},
    ]
    assert best_row(rows) is rows[2]


def test_a_bad_search_is_one_line_on_the_command_line(capsys, toy_root, tmp_path):
    line = error_line(capsys, search_args(toy_root, tmp_path, "search.trials=2", "search.model.dropout=[0.5,0.0,0.5]"))
    assert "repeats a choice" in line
    line = error_line(capsys, [*search_args(toy_root, tmp_path, "search.trials=2"), "search.optim.lr=log(1,0.1)"])
    assert "search.optim.lr=log(1,0.1) is reversed" in line
    line = error_line(capsys, search_args(toy_root, tmp_path, "search.trials=2", "search.model.dropout=[0.5,1.5]"))
    assert line == "error: search.model.dropout: the value 1.5 is refused: model.dropout must be in [0, 1), got 1.5"
    line = error_line(capsys, search_args(toy_root, tmp_path, "search.trials=2", "trainer.devices=2"))
    assert "give launch=local or launch=slurm" in line  # DDP workers would re-run the search itself
    assert not (tmp_path / "searches").exists()  # nothing was asked or written
    unreachable = "search.storage=postgresql://nobody:pw@127.0.0.1:9/nothing"  # the discard port: refused
    line = error_line(capsys, search_args(toy_root, tmp_path, "search.trials=2", unreachable))
    assert "the study's database cannot be opened" in line and "pw@" not in line and "***" in line


def test_a_search_runs_its_trials_tells_optuna_and_reports_one_test(toy_root, tmp_path):
    result = run_train(search_args(toy_root, tmp_path, "search.trials=3"))
    folder = Path(result["parent"])
    study = optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    for trial, row in zip(study.trials, result["trials"]):
        # the value Optuna holds is the trial's own run's validation accuracy, from its metrics.json
        metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert trial.value == metrics["val"]["acc"] == row["val"]["acc"]
        assert trial.params == row["params"] and 1e-4 <= trial.params["optim.lr"] <= 3e-2
        ran = OmegaConf.load(Path(row["run_dir"]) / "config.yaml")
        assert (ran.optim.lr, ran.model.dropout) == (trial.params["optim.lr"], trial.params["model.dropout"])
    best = result["best"]
    assert best is best_row(result["trials"]) or best == best_row(result["trials"])
    # only the chosen trial carries test figures, with their interval
    assert [r["test"] is not None for r in result["trials"]] == [r is best for r in result["trials"]]
    assert len(best["test"]["acc_ci95"]) == 2
    summary = (folder / "summary.md").read_text()
    assert f"Trial {best['trial']}:" in summary and "95% interval" in summary
    # the same command with more trials continues the same study: the first three are not run again
    more = run_train(search_args(toy_root, tmp_path, "search.trials=4"))
    assert more["parent"] == result["parent"] and len(more["trials"]) == 4
    assert [r["val"] for r in more["trials"][:3]] == [r["val"] for r in result["trials"]]
    assert more["trials"][3]["params"] not in [r["params"] for r in result["trials"]]


def test_a_pruned_trial_is_told_as_pruned(toy_root, tmp_path, monkeypatch):
    """Pruning stops a trial's run from inside Lightning (Optuna's callback) and the study records it."""
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 1)
    result = run_train(search_args(toy_root, tmp_path, "search.trials=2", "search.prune=true"))
    assert [r["status"] for r in result["trials"]] == ["ok", "pruned"]
    folder = Path(result["parent"])
    study = optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"]
    assert study.trials[1].intermediate_values  # the epoch it reported before it was stopped


@pytest.mark.slow
def test_machines_share_a_search_through_a_real_postgresql(postgres_url, toy_root, tmp_path):
    """Two "machines" (two out_dirs) run the same command against one PostgreSQL study: the second adds
    trials to the first's and reports all of them; the database holds what the runs measured."""
    storage = f"search.storage={postgres_url}"
    first = run_train(search_args(toy_root, tmp_path / "machine1", "search.trials=2", storage))
    shutil.rmtree(tmp_path / "machine1")  # the first machine's folders are not on the second
    second = run_train(search_args(toy_root, tmp_path / "machine2", "search.trials=3", storage))
    study = optuna.load_study(study_name=Path(first["parent"]).name, storage=postgres_url)
    assert Path(first["parent"]).name == Path(second["parent"]).name
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert [t.value for t in study.trials[:2]] == [r["val"]["acc"] for r in first["trials"]]
    assert [r["val"]["acc"] for r in second["trials"]] == [t.value for t in study.trials]
    assert second["trials"][2]["run_dir"].startswith(str(tmp_path / "machine2"))
    assert all("run elsewhere" in r["note"] for r in second["trials"][:2])
    # their rows came through the database whole: the loss that breaks ties, the run folder's name
    assert [r["val"] for r in second["trials"][:2]] == [r["val"] for r in first["trials"]]
    assert second["storage"].startswith("postgresql://postgres@127.0.0.1:")


def same_trials(a: dict, b: dict) -> bool:
    """Two searches proposed the same values and measured the same validation figures."""
    return [(r["params"], r["val"]) for r in a["trials"]] == [(r["params"], r["val"]) for r in b["trials"]]


@pytest.mark.slow
def test_trials_run_by_the_local_launcher_equal_the_serial_search(toy_root, tmp_path):
    """Two trials asked at once (launch.parallel=2), each in its own process: the same values (the sampler
    draws them in the same order) and the same figures as one after another."""
    serial = run_train(search_args(toy_root, tmp_path / "serial", "search.trials=2"))
    local = run_train(search_args(toy_root, tmp_path / "local", "search.trials=2", "launch=local", "launch.parallel=2"))
    assert same_trials(serial, local) and local["best"]["trial"] == serial["best"]["trial"]
    assert (Path(local["parent"]) / "launch").is_dir()  # it did run its trials as processes
