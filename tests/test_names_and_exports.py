"""File names that are not UTF-8 (zips made on Windows) survive training, predict.py and their CSVs;
exports carry the checkpoint's class names."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import predict
from lightning_modules.cam import cam_available
from pipeline.prediction import write_csv
from pipeline.runner.evaluation import write_predictions

from conftest import fast_args
from helpers import read_metrics, run_dir, run_train
from toy_data import make_image_tree

# the bytes a Windows zip stores for "café.jpg" (Latin-1), and the name Python gives them on Linux
RAW_NAME = b"caf\xe9.jpg"
NAME = os.fsdecode(RAW_NAME)
# float32 on the same inputs: only kernel choice and summation order differ
PARITY_TOLERANCE = 1e-4


def _csv_rows(path: Path) -> list[dict[str, str]]:
    # surrogateescape: the reading side of a lossless write, names come back as os.listdir gives them
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


def _checkpoint_class_names(ckpt: str) -> list[str]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]["class_names"]


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory) -> dict:
    """A stage=frozen run whose test split holds a readable image named with non-UTF-8 bytes."""
    root = make_image_tree(tmp_path_factory.mktemp("odd_data"), size=32)
    cats = root / "test" / "cats"
    Image.open(cats / "cats.0.png").convert("RGB").save(os.fsencode(cats) + b"/" + RAW_NAME, quality=95)
    (cats / "cats.0.png").unlink()
    metrics = run_train(fast_args(root, tmp_path_factory.mktemp("odd_run"), stage="frozen"))
    return metrics | {"root": str(root)}


def test_write_predictions_keeps_the_original_name_bytes(tmp_path):
    path = tmp_path / "test_predictions.csv"
    logits, targets = torch.tensor([[2.0, -1.0], [-1.0, 3.0]]), torch.tensor([0, 1])
    write_predictions(path, [f"test/cats/{NAME}", "test/dogs/d.png"], ["cats", "dogs"], False, (logits, targets))
    assert b"\ntest/cats/" + RAW_NAME + b",cats,cats," in path.read_bytes()
    rows = _csv_rows(path)
    assert [(r["file"], r["target"], r["predicted"]) for r in rows] == [
        (f"test/cats/{NAME}", "cats", "cats"),
        ("test/dogs/d.png", "dogs", "dogs"),
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["test_predictions.csv"]  # no temporary file left


def test_predict_csv_keeps_the_original_name_bytes(tmp_path):
    path = tmp_path / "preds.csv"
    write_csv(path, ["cats", "dogs"], [(NAME, "cats", [0.75, 0.25], ""), ("bad.jpg", "", [], "cannot identify")])
    assert b"\n" + RAW_NAME + b",cats,0.750000,0.250000," in path.read_bytes()
    rows = _csv_rows(path)
    assert [r["file"] for r in rows] == [NAME, "bad.jpg"] and rows[1]["prob_cats"] == ""


def test_a_frozen_run_with_a_non_utf8_test_file_name_finishes(odd_run):
    folder = run_dir(odd_run)
    assert read_metrics(folder)["test"]["count"] == 16  # the odd file was tested, not skipped
    raw = (folder / "test_predictions.csv").read_bytes()
    assert b"/test/cats/" + RAW_NAME + b",cats," in raw
    assert sum(r["file"].endswith(NAME) for r in _csv_rows(folder / "test_predictions.csv")) == 1


def test_predict_on_a_folder_with_a_non_utf8_file_name(odd_run, tmp_path, capsys):
    output, cams = tmp_path / "preds.csv", tmp_path / "cams"
    args = [f"ckpt_path={odd_run['best_ckpt']}", f"inputs={odd_run['root']}/test", f"output={output}", "num_workers=0"]
    if cam_available():
        args.append(f"cam_dir={cams}")
    result = predict.main(args)
    # pytest's captured stdout refuses surrogates like a UTF-8 terminal: console lines are checked too
    assert "classified 16 of 16 files" in capsys.readouterr().out
    assert result["predictions"]["errors"] == 0
    assert b"/test/cats/" + RAW_NAME + b"," in output.read_bytes()
    odd = [r for r in _csv_rows(output) if r["file"].endswith(NAME)]
    assert len(odd) == 1 and odd[0]["error"] == "" and odd[0]["predicted"] in ("cats", "dogs")
    if cam_available():
        assert b"caf\xe9.gradcam.png" in os.listdir(os.fsencode(cams))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exports_carry_the_checkpoints_class_names(odd_run, tmp_path, capsys, fmt):
    if fmt == "onnx":
        onnx = pytest.importorskip("onnx", reason="pip install -e '.[export]'")
        pytest.importorskip("onnxruntime", reason="pip install -e '.[export]'")
    ckpt = odd_run["best_ckpt"]
    expected = _checkpoint_class_names(ckpt)
    assert expected == ["cats", "dogs"]
    path = tmp_path / f"model.{fmt}"
    result = predict.main([f"ckpt_path={ckpt}", f"export={fmt}", f"export_path={path}"])
    assert result["export"]["max_abs_diff"] <= PARITY_TOLERANCE
    assert f"class names, in output order: {json.dumps(expected)}" in capsys.readouterr().out
    if fmt == "torchscript":
        extra = {"class_names.json": ""}
        torch.jit.load(str(path), _extra_files=extra)
        stored = json.loads(extra["class_names.json"])
    else:
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        stored = json.loads(props["class_names"])
        assert [p.name for p in tmp_path.iterdir()] == [path.name]  # weights inline, no .onnx.data
    assert stored == expected


def test_class_names_that_are_not_utf8_round_trip_through_an_export(odd_run, tmp_path):
    # a class folder from the same kind of zip: the ONNX metadata (UTF-8 only) must still hold it
    onnx = pytest.importorskip("onnx", reason="pip install -e '.[export]'")
    pytest.importorskip("onnxruntime", reason="pip install -e '.[export]'")
    from pipeline.export import export_model
    from pipeline.prediction import load_model

    model = load_model(odd_run["best_ckpt"])
    model.class_names = ["cats", os.fsdecode(b"chi\xe9ns")]
    path, _ = export_model(model, 32, "onnx", tmp_path / "model.onnx")
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["class_names"]) == model.class_names
