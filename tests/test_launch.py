"""launch=serial|local|slurm: the same study, the same summary, whichever launcher ran its cells."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import pipeline.studies.launch as launch
from core.errors import ConfigError
from pipeline.config.load import load_config
from pipeline.studies.launch import collect, rows_path, take_launch

from helpers import comparable, run_train, study_args


def test_launch_keys_are_taken_apart_and_checked(monkeypatch):
    mine, rest = take_launch(["stage=features", "launch=local", "launch.parallel=2", "seeds=[1,2]"])
    assert mine == ["launch.mode=local", "launch.parallel=2"] and rest == ["stage=features", "seeds=[1,2]"]
    with pytest.raises(ConfigError, match="launch.mode='cloud' is not valid; choose one of: serial, local, slurm"):
        load_config(["launch.mode=cloud"])
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="launch=slurm needs SLURM's sbatch on PATH"):
        launch.check_launch(load_config(["launch.mode=slurm"]))


def test_a_cell_whose_process_died_is_a_failed_row(tmp_path):
    cell = {"name": "cell000-seed=1", "params": {}, "seed": 1}
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "cell000-seed=1.log").write_text("Killed\n")
    (tmp_path / "launch" / "cell000-seed=1.exit").write_text("exit code -9\n")
    [row] = collect(tmp_path, cell)
    assert row["status"] == "failed" and "exit code -9" in row["error"] and "cell000-seed=1.log" in row["error"]
    rows_path(tmp_path, cell).write_text(json.dumps([{"cell": cell["name"], "status": "ok"}]))
    assert collect(tmp_path, cell) == [{"cell": cell["name"], "status": "ok"}]


@pytest.mark.slow
def test_local_launch_gives_the_serial_summary(toy_root, tmp_path, weights_file):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    weights = [str(weights_file), str(broken)]
    serial = run_train(study_args(toy_root, tmp_path / "serial", weights))
    local = run_train([*study_args(toy_root, tmp_path / "local", weights), "launch=local", "launch.parallel=2"])
    assert [r["status"] for r in local["rows"]] == ["ok", "ok", "failed", "failed"]
    assert comparable(Path(serial["parent"]) / "summary.md") == comparable(Path(local["parent"]) / "summary.md")
    assert sorted(p.name for p in (Path(local["parent"]) / "hparams").iterdir() if p.is_dir()) == sorted(
        p.name for p in (Path(serial["parent"]) / "hparams").iterdir() if p.is_dir()
    )
    # the same command continues: finished cells are read back, not run again
    shutil.rmtree(Path(local["parent"]) / "launch")
    again = run_train([*study_args(toy_root, tmp_path / "local", weights), "launch=local", "launch.parallel=2"])
    assert [r["status"] for r in again["rows"]] == ["ok", "ok", "failed", "failed"]
    assert again["rows"][:2] == local["rows"][:2]


def test_srun_tasks_must_be_per_node_and_match_the_devices(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NAME", "python")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    args = ["trainer.accelerator=cpu", "trainer.devices=2"]
    with pytest.raises(ConfigError, match=r"use srun --ntasks-per-node=2 matching trainer.devices=2"):
        load_config(args)
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    with pytest.raises(ConfigError, match=r"--ntasks-per-node=4 must equal trainer.devices=2"):
        load_config(args)
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    assert load_config(args).trainer.devices == 2


def test_a_launcher_without_a_study_is_refused(toy_root, tmp_path):
    from pipeline.api import run_argv

    with pytest.raises(ConfigError, match="launch=local runs a study's cells"):
        run_argv(["launch=local", f"data.root={toy_root}", f"out_dir={tmp_path}"])
