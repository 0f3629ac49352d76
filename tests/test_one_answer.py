"""One answer per image: stage=test, predict.py and the export agree on a calibrated checkpoint
trained with test-time flip; the reported figures carry intervals and calibration."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

import predict
from datamodules.image_io import load_rgb
from datamodules.transforms import eval_transform
from pipeline.export import export_model, run_exported
from pipeline.prediction import load_model

from conftest import fast_args
from helpers import checkpoint_state, read_metrics, run_train
from toy_data import make_image_tree

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def flip_run(tmp_path_factory) -> dict:
    root = make_image_tree(tmp_path_factory.mktemp("flip_data"), size=36)
    out = tmp_path_factory.mktemp("flip_run")
    # eval.temperature=fit: 16 validation images cannot support a temperature under the default
    # rule, and this module checks that a fitted one reaches stage=test, predict.py and the export
    args = fast_args(
        root,
        out,
        stage="frozen",
        **{"model.tta_flip": "true", "trainer.max_epochs": "3", "eval.temperature": "fit"},
    )
    return run_train(args) | {"root": str(root), "out": str(out)}


def _rows(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        return {r["file"]: [float(r["prob_cats"]), float(r["prob_dogs"])] for r in csv.DictReader(f)}


def test_metrics_carry_intervals_and_calibration(flip_run):
    metrics = read_metrics(Path(flip_run["run_dir"]))
    for split in ("val", "test"):
        m = metrics[split]
        low, high = m["acc_ci95"]
        assert low <= m["acc"] <= high and high - low > 0.05  # 16 images: a wide interval
        assert 0 <= m["ece"] <= 1 and 0 <= m["ece_uncalibrated"] <= 1
    assert "Wilson" in metrics["intervals"]
    temperature = metrics["calibration"]["temperature"]
    assert temperature != 1.0
    stored = checkpoint_state(Path(metrics["calibration"]["stored_in"]))["temperature"]
    assert float(stored) == pytest.approx(temperature)
    assert metrics["calibration"]["stored_in"] == metrics["best_ckpt"]
    # validation NLL is what the temperature minimises
    assert metrics["val"]["loss"] <= metrics["val"]["loss_uncalibrated"] + 1e-6
    assert (Path(flip_run["run_dir"]) / "reliability_test.png").is_file()


def test_stage_test_predict_and_export_give_the_same_probabilities(flip_run, tmp_path):
    metrics = read_metrics(Path(flip_run["run_dir"]))
    ckpt = metrics["best_ckpt"]
    recorded = _rows(Path(metrics["test_predictions"]))  # the run's own test pass, calibrated
    assert len(recorded) == 16

    # stage=test on the checkpoint reproduces the run's calibrated test figures
    again = run_train(fast_args(Path(flip_run["root"]), tmp_path / "test_run", stage="test", ckpt_path=ckpt))
    for key in ("acc", "loss", "ece"):
        assert again["test"][key] == pytest.approx(metrics["test"][key], abs=TOLERANCE), key

    # predict.py on the same files
    output = tmp_path / "preds.csv"
    test_dir = Path(flip_run["root"]) / "test"
    predict.main([f"ckpt_path={ckpt}", f"inputs={test_dir}", f"output={output}", "num_workers=0"])
    predicted = _rows(output)
    assert set(predicted) == set(recorded)

    # the exported models on the same preprocessed images
    model = load_model(ckpt)
    assert model.hparams.tta_flip and float(model.temperature) != 1.0
    size = int(model.hparams.image_size)
    transform = eval_transform(size, model.backbone.mean, model.backbone.std)
    files = sorted(recorded)
    images = torch.stack([transform(load_rgb(f, size)) for f in files])
    formats = ["torchscript"]
    try:
        import onnxruntime  # noqa: F401

        formats.append("onnx")
    except ImportError:
        pass
    for fmt in formats:
        path, _ = export_model(model, size, fmt, tmp_path / f"model.{fmt}")
        exported = run_exported(fmt, path, images)
        for i, f in enumerate(files):
            assert exported[i].tolist() == pytest.approx(recorded[f], abs=TOLERANCE), (fmt, f)
    for f in files:
        assert predicted[f] == pytest.approx(recorded[f], abs=TOLERANCE), f

    # and without the flip and temperature the answers would differ: the check can fail
    with torch.no_grad():
        plain = model.probabilities(model.head(model.backbone(images)))
    assert (plain - torch.tensor([recorded[f] for f in files])).abs().max() > 10 * TOLERANCE


def test_an_exif_rotated_photo_gets_the_upright_photos_answer(flip_run, tmp_path):
    ckpt = read_metrics(Path(flip_run["run_dir"]))["best_ckpt"]
    source = next((Path(flip_run["root"]) / "test" / "dogs").glob("*.png"))
    upright = Image.open(source).convert("RGB").resize((48, 32))
    folder = tmp_path / "photos"
    folder.mkdir()
    upright.save(folder / "upright.jpg", quality=100, subsampling=0)
    # what a phone writes: pixels stored sideways, EXIF orientation 6 ("rotate 90 CW to view")
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "sideways.jpg", quality=100, subsampling=0, exif=exif)
    output = tmp_path / "preds.csv"
    predict.main([f"ckpt_path={ckpt}", f"inputs={folder}", f"output={output}", "num_workers=0"])
    rows = {Path(f).name: p for f, p in _rows(output).items()}
    assert rows["sideways.jpg"] == pytest.approx(rows["upright.jpg"], abs=2e-3)  # JPEG re-encoding noise
