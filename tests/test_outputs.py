"""What a researcher sees after training: TensorBoard views, stage=all's table, predict.py, export."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import predict
from lightning_modules.cam import cam_available
from pipeline.export import export_model, run_exported
from pipeline.prediction import load_model
from pipeline.runner.evaluation import read_correct

from conftest import fast_args
from helpers import read_metrics, run_dir, run_train, scalar_tags
from toy_data import make_image_tree

# float32 on the same inputs: only kernel choice and summation order differ
PARITY_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def noisy_root(tmp_path_factory) -> Path:
    """Toy data whose validation split has two mislabelled images, so there are errors to show."""
    root = make_image_tree(tmp_path_factory.mktemp("noisy"), size=32)
    for i in (0, 1):
        shutil.move(root / "validation" / "cats" / f"cats.{i}.png", root / "validation" / "dogs" / f"cat{i}.png")
    return root


def test_features_stage_shows_its_errors_read_back_from_the_files(noisy_root, tmp_path):
    """stage=features trains on cached features: the error grid reads the wrong images from their files."""
    args = fast_args(
        noisy_root, tmp_path, stage="features", **{"trainer.max_epochs": "2", "log.images_every_n_epochs": "1"}
    )
    acc = _events(run_dir(run_train(args)))
    images = {tag: len(acc.Images(tag)) for tag in acc.Tags()["images"]}
    assert images["val/most_confident_errors"] == 2 and images["val/confusion_matrix"] == 2
    assert "train/augmented_inputs" not in images  # features are not augmented images


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_views_of_a_run(noisy_root, tmp_path):
    metrics = run_train(
        fast_args(noisy_root, tmp_path, stage="frozen", **{"trainer.max_epochs": "4", "log.images_every_n_epochs": "2"})
    )
    acc = _events(run_dir(metrics))
    tags = acc.Tags()
    steps = {tag: [e.step for e in acc.Scalars(tag)] for tag in tags["scalars"]}
    assert len(steps["train/loss"]) == 4 * 6  # every step
    for tag in ("train/acc", "train/loss_epoch", "trainable_params"):
        assert len(steps[tag]) == 4, tag  # once per epoch
    assert len(steps["lr/head"]) == 4 * 6  # every step
    assert not any(tag.startswith("lr/block") for tag in steps)  # stage=frozen never trains a block
    assert len(steps["val/acc"]) == 4 + 1  # per epoch, plus the best checkpoint's final validation
    assert "custom_scalars__config__" in tags["tensors"]
    layout = acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0].decode(errors="ignore")
    assert "epoch/train_acc" in layout and "epoch/val_loss" in layout
    assert [s for s, _ in scalar_tags(run_dir(metrics))["epoch/val_acc"]] == [0, 1, 2, 3]  # x: the epoch
    images = {tag: len(acc.Images(tag)) for tag in tags["images"]}
    assert images["train/augmented_inputs"] == 1
    assert images["val/confusion_matrix"] == 2  # every 2nd of 4 epochs
    assert images["val/most_confident_errors"] == 2  # the mislabelled images are always wrong
    if cam_available():  # the same grid with Grad-CAM overlays, same size
        assert images["val/most_confident_errors_gradcam"] == 2
        plain, cam = (acc.Images(t)[0] for t in ("val/most_confident_errors", "val/most_confident_errors_gradcam"))
        assert (plain.width, plain.height) == (
            cam.width,
            cam.height,
        ) and plain.encoded_image_string != cam.encoded_image_string
    assert len(acc.Tensors("val/pr_curve")) == 2
    assert any(t.startswith("freeze_schedule") for t in tags["tensors"])
    hparams = {meta.plugin_data.plugin_name for meta in acc.summary_metadata.values()}
    assert "hparams" in hparams
    assert metrics["val"]["acc"] <= 14 / 16  # the two mislabelled images count as errors


def test_stage_all_writes_a_three_row_comparison(toy_root, tmp_path, monkeypatch):
    import pipeline.config.load as load

    compositions = []
    compose = load.compose
    monkeypatch.setattr(load, "compose", lambda *a, **k: compositions.append(a) or compose(*a, **k))
    result = run_train(fast_args(toy_root, tmp_path, stage="all", **{"all.epochs": "[2,2,3]"}))
    # composed once for the command, once per method (each has its own presets), once for the fine-tune
    # preset's schedule; each method's run gets its built config (was 11 compositions)
    assert len(compositions) == 5
    folder = Path(result["run_dir"])
    table = (folder / "comparison.md").read_text().split("Paired McNemar")[0].strip().splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == 3
    methods = result["methods"]
    # the paired tests count, per pair, the test images one method gets right and the other wrong
    correct = [read_correct(m["test_predictions"]) for m in methods]
    assert [(t["a"], t["b"]) for t in result["mcnemar"]] == [
        (methods[i]["method"], methods[j]["method"]) for i, j in ((0, 1), (0, 2), (1, 2))
    ]
    for t, (i, j) in zip(result["mcnemar"], ((0, 1), (0, 2), (1, 2))):
        assert t["n"] == 16 and 0 < t["p_value"] <= 1
        assert t["a_only"] == sum(correct[i][f] and not correct[j][f] for f in correct[i])
        assert t["b_only"] == sum(correct[j][f] and not correct[i][f] for f in correct[i])
    assert [m["stage"] for m in methods] == ["features", "frozen", "finetune"]
    assert [m["epochs"] for m in methods] == [2, 2, 3]
    for m in methods:
        assert 0.75 <= m["test"]["acc"] <= 1.0 and 0.75 <= m["val"]["acc"] <= 1.0
        assert m["wall_time_s"] > 0 and m["test"]["count"] == 16
    assert methods[0]["trainable_params"] == methods[1]["trainable_params"] < methods[2]["trainable_params"]
    # the fine-tuning run started from the frozen run's best checkpoint, in a folder named like the rest
    finetune_cfg = OmegaConf.load(Path(methods[2]["run_dir"]) / "config.yaml")
    assert finetune_cfg.finetune.init_ckpt == methods[1]["best_ckpt"]
    assert finetune_cfg.plan.phases == [[0, 3, 1]]  # no second head warm-up: the top block trains at once
    assert {Path(m["run_dir"]).name for m in methods} == {folder.name}
    assert "comparison" in _events(folder).Tags()["tensors"][0]


def test_predict_folder_with_a_corrupt_file(trained_ckpt, tmp_path, capsys):
    images = make_image_tree(tmp_path / "new", per_class={"train": 0, "validation": 0, "test": 10}, size=40, seed=5)
    nested = images / "test" / "dogs" / "deeper"
    nested.mkdir()
    shutil.move(images / "test" / "dogs" / "dogs.0.png", nested / "dogs.0.png")
    (images / "test" / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    output = tmp_path / "preds.csv"
    result = predict.main([f"ckpt_path={trained_ckpt}", f"inputs={images}", f"output={output}", "num_workers=0"])
    assert "classified 20 of 21 files" in capsys.readouterr().out
    with open(output) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "predicted", "prob_cats", "prob_dogs", "error"]
    assert len(rows) == 21 and result["predictions"]["errors"] == 1
    broken = [r for r in rows if r["file"].endswith("broken.jpg")][0]
    assert broken["error"] and broken["predicted"] == ""
    good = [r for r in rows if not r["error"]]
    correct = sum(r["predicted"] == Path(r["file"]).name.split(".")[0] for r in good)
    assert correct >= 0.8 * len(good)
    assert all(abs(float(r["prob_cats"]) + float(r["prob_dogs"]) - 1) < 1e-5 for r in good)


def test_predict_bad_arguments_are_one_line(capsys, trained_ckpt):
    with pytest.raises(SystemExit):
        predict.main([f"ckpt_path={trained_ckpt}", "inputs=/no/such/*.jpg"])
    assert "matches no file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.main([f"ckpt_path={trained_ckpt}", "export=tflite"])
    assert "choose one of: onnx, torchscript" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_pytorch(trained_ckpt, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="pip install -e '.[export]'")
    model = load_model(trained_ckpt)
    path, diff = export_model(model, 32, fmt, tmp_path / f"model.{fmt}")
    assert path.is_file() and diff <= PARITY_TOLERANCE
    # the same normalised batch through both, batch size other than the one traced with
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the checkpoint's own evaluation, not the export's wrapper
        expected = model.probabilities(model.logits(images))
    got = run_exported(fmt, path, images)
    assert got.shape == (5, 2)
    assert (got - expected).abs().max() <= PARITY_TOLERANCE
    assert read_metrics(Path(trained_ckpt).parent.parent)["stage"] == "frozen"
