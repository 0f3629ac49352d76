"""The Python API: the same config, validation, errors and metrics as the command line."""

from __future__ import annotations

import csv

import pytest
import torch
from PIL import Image

import pipeline
from core.errors import ConfigError, UserError
from datamodules.image_io import load_rgb
from pipeline.api import to_argv

from conftest import fast_args
from helpers import run_train


def _as_kwargs(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in args)


def test_keyword_arguments_become_the_command_lines_overrides():
    argv = to_argv(
        {"data_root": "photos", "optim_lr": 1e-4, "seeds": [1, 2], "model.pretrained": False, "ckpt_path": None}
    )
    assert argv == ["data.root=photos", "optim.lr=0.0001", "seeds=[1,2]", "model.pretrained=false", "ckpt_path=null"]


def test_run_gives_the_metrics_of_train_py(toy_root, tmp_path):
    args = fast_args(toy_root, tmp_path / "cli", stage="frozen", **{"trainer.max_epochs": "2"})
    cli = run_train(args)
    kwargs = _as_kwargs(args) | {"out_dir": str(tmp_path / "api")}
    stage = kwargs.pop("stage")
    api = pipeline.run(stage, **kwargs)
    for split in ("val", "test"):
        for key in ("acc", "loss", "count", "ece"):
            assert api[split][key] == pytest.approx(cli[split][key], abs=1e-6), (split, key)
    assert api["run_dir"] != cli["run_dir"] and api["run_dir"].startswith(str(tmp_path / "api"))


def test_run_raises_the_command_lines_one_line_errors(toy_root, tmp_path, capsys):
    args = fast_args(toy_root, tmp_path, stage="frozen", **{"optim.nmae": "adam"})
    with pytest.raises(SystemExit):
        run_train(args)
    cli_line = capsys.readouterr().err.strip().splitlines()[-1]
    kwargs = _as_kwargs(args)
    with pytest.raises(ConfigError) as caught:
        pipeline.run(kwargs.pop("stage"), **kwargs)
    assert cli_line == f"error: {caught.value}"
    assert "\n" not in str(caught.value)
    missing = _as_kwargs(fast_args(tmp_path / "missing", tmp_path, stage="frozen"))
    del missing["stage"]
    with pytest.raises(UserError) as caught:
        pipeline.run("frozen", **missing)
    assert str(caught.value) and "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def trained(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("api_model")
    return run_train(fast_args(toy_root, out, stage="frozen", **{"trainer.max_epochs": "2"}))


def test_load_model_and_predict_match_the_runs_own_test_predictions(trained, toy_root):
    model = pipeline.load_model(trained["best_ckpt"])
    with open(trained["test_predictions"], newline="") as f:
        recorded = {row["file"]: row for row in csv.DictReader(f)}
    rows = pipeline.predict(model, toy_root / "test")
    assert len(rows) == len(recorded) == 16
    for row in rows:
        assert not row["error"] and row["predicted"] in model.class_names
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-5
        saved = recorded[row["file"]]
        assert row["predicted"] == saved["predicted"]
        for name, p in row["probabilities"].items():
            assert p == pytest.approx(float(saved[f"prob_{name}"]), abs=1e-4)


def test_predict_takes_pil_images_and_reports_unreadable_files(trained, toy_root, tmp_path):
    model = pipeline.load_model(trained["best_ckpt"])
    files = sorted((toy_root / "test" / "dogs").iterdir())[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    size = int(model.hparams.image_size)
    mixed = [files[0], load_rgb(files[1], size), str(files[2]), broken]
    rows = pipeline.predict(model, mixed)
    by_file = pipeline.predict(model, files)
    assert rows[0]["probabilities"] == pytest.approx(by_file[0]["probabilities"], abs=1e-6)
    assert rows[1]["file"] is None
    assert rows[1]["probabilities"] == pytest.approx(by_file[1]["probabilities"], abs=1e-5)
    assert rows[2]["predicted"] == by_file[2]["predicted"]
    assert rows[3]["predicted"] is None and rows[3]["error"]
    with pytest.raises(ConfigError, match="paths or PIL images"):
        pipeline.predict(model, [torch.zeros(3, 8, 8)])
    assert isinstance(mixed[1], Image.Image)
