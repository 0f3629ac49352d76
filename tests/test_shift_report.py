"""The shift report (issue 18): deterministic shifts, numbers that match the per-image predictions,
the files it writes, and the extra test folders."""

from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageFilter

from core.errors import ConfigError
from datamodules.image_io import load_rgb
from datamodules.shifts import SEVERITIES, SHIFT_NAMES, SHIFTS, apply_shift, variant_name
from datamodules.transforms import eval_transform
from lightning_modules.calibration import ece
from lightning_modules.classifier import TransferClassifier
from pipeline.config.load import RunConfig
from pipeline.inference import cost_line, eval_batch_size, predict_variants, shift_variants
from pipeline.robustness.shift_report import (
    check_extra_tests,
    resolve_shifts,
    run_extra_tests,
    run_shift_report,
    validate_shift_config,
)
from pipeline.studies.statistics import wilson_interval

from conftest import BACKBONE, stand_in_init
from helpers import image_counts, scalar_tags
from toy_data import make_image_tree


def _photo(seed: int = 0, size: tuple[int, int] = (240, 200)) -> Image.Image:
    """A textured picture larger than the low-resolution sizes (the toy images are 40 px)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(3))


def _bytes(image: Image.Image) -> bytes:
    return image.tobytes() + repr(image.size).encode()


@pytest.mark.parametrize("name", SHIFT_NAMES)
def test_each_shift_is_a_function_of_image_seed_and_key_only(name):
    image = _photo()
    torch.manual_seed(1)
    np.random.seed(1)
    first = {sev: _bytes(apply_shift(image, name, sev, seed=3, key=5)) for sev in SEVERITIES}
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    torch.manual_seed(2)  # other global RNG states: the same shifted images
    np.random.seed(2)
    again = {sev: _bytes(apply_shift(image, name, sev, seed=3, key=5)) for sev in SEVERITIES}
    assert first == again
    torch.manual_seed(1)
    np.random.seed(1)
    apply_shift(image, name, 1, seed=3, key=5)
    assert torch.equal(torch.get_rng_state(), torch_state)  # the global generators are not consumed
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert first[1] != first[2]
    assert first[1] != _bytes(image)


def test_random_shifts_change_with_the_seed_and_the_image():
    image = _photo()
    noisy = _bytes(apply_shift(image, "noise", 1, seed=0, key=0))
    assert noisy != _bytes(apply_shift(image, "noise", 1, seed=1, key=0))
    assert noisy != _bytes(apply_shift(image, "noise", 1, seed=0, key=1))
    assert noisy != _bytes(apply_shift(image, "noise", 1, seed=0, key="0.png"))
    turned = [_bytes(apply_shift(image, "rotation", 1, seed=s, key=k)) for s in (0, 1) for k in range(16)]
    assert turned[:16] != turned[16:]  # rotation directions are drawn per image: 2**-16 to collide
    assert len(set(turned)) == 2  # one magnitude, two directions


@pytest.mark.parametrize("name", SHIFT_NAMES)
def test_severity_two_damages_more_than_one(name):
    image = _photo()
    transform = eval_transform(150, [0.5] * 3, [0.25] * 3)
    clean = transform(image)
    damage = [float((transform(apply_shift(image, name, sev, 0, 0)) - clean).abs().mean()) for sev in SEVERITIES]
    assert 0 < damage[0] < damage[1], damage


def test_low_resolution_and_unknown_names():
    image = _photo()
    assert min(apply_shift(image, "lowres", 1, 0, 0).size) == 112
    assert min(apply_shift(image, "lowres", 2, 0, 0).size) == 64
    small = _photo(size=(40, 40))
    assert _bytes(apply_shift(small, "lowres", 2, 0, 0)) == _bytes(small)  # never upscaled
    with pytest.raises(ValueError, match="unknown shift"):
        apply_shift(image, "fog", 1, 0, 0)
    with pytest.raises(ValueError, match="severity"):
        apply_shift(image, "jpeg", 3, 0, 0)


def test_eval_shifts_config(tmp_path):
    assert resolve_shifts("auto", on_gpu=False) == []
    assert resolve_shifts("auto", on_gpu=True) == list(SHIFT_NAMES)
    assert resolve_shifts("all", on_gpu=False) == list(SHIFT_NAMES)
    assert resolve_shifts("none", on_gpu=True) == resolve_shifts(None, on_gpu=True) == []
    assert resolve_shifts("jpeg,blur", on_gpu=False) == ["jpeg", "blur"]
    assert resolve_shifts(["noise", "noise", "jpeg"], on_gpu=False) == ["noise", "jpeg"]
    with pytest.raises(ConfigError, match="unknown shift 'fog'.*lowres, jpeg"):
        resolve_shifts(["jpeg", "fog"], on_gpu=True)
    with pytest.raises(ConfigError, match="unknown shift 'all'"):
        resolve_shifts(["all"], on_gpu=True)
    defaults = OmegaConf.structured(RunConfig).eval
    assert (defaults.shifts, defaults.shift_seed, list(defaults.extra_tests)) == ("auto", 0, [])
    cli = OmegaConf.from_dotlist(["eval.shifts=[jpeg,blur]", "eval.extra_tests=[web=/x/y]", "eval.shift_seed=4"])
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), cli)
    assert list(cfg.eval.shifts) == ["jpeg", "blur"] and list(cfg.eval.extra_tests) == ["web=/x/y"]
    assert cfg.eval.shift_seed == 4
    with pytest.raises(ConfigError, match="web=/x/y: no such folder"):
        validate_shift_config(cfg.eval)
    cfg.eval.extra_tests = [f"web={tmp_path}"]
    validate_shift_config(cfg.eval)
    cfg.eval.shifts = ["jpeg", "haze"]
    with pytest.raises(ConfigError, match="haze"):
        validate_shift_config(cfg.eval)


def test_cost_line_and_batch_rule():
    assert cost_line(1000, 16, 80.0) == "shift report: 16 shifted copies of 1000 test images, about 200 s at 80.0 img/s"
    assert "(and the clean one)" in cost_line(10, 2, 1.0, clean=True)
    assert eval_batch_size("cpu", 20) == 4
    assert eval_batch_size("cpu", 2) == 2


# --- the report on a tiny model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = TransferClassifier(
        backbone=BACKBONE, class_names=["cats", "dogs"], image_size=32,
        head={"pool": "avg", "hidden": 8, "dropout": 0.0}, optim_name="adam", weight_decay=0.0,
        decay_norm_and_bias=False, train_bn=False, tta_flip=False,
        label_smoothing=0.0,
    )  # fmt: skip
    stand_in_init(model.backbone)  # logits that differ from image to image and shift to shift
    model.temperature.fill_(1.7)
    root = make_image_tree(tmp_path_factory.mktemp("shift_toy"), per_class={"train": 1, "validation": 1, "test": 6})
    test = root / "test"
    samples = [(str(p), label) for label, c in enumerate(["cats", "dogs"]) for p in sorted((test / c).glob("*"))]
    return model.train(), root, samples


def _by_hand(model, samples, shift: str, severity: int, seed: int) -> torch.Tensor:
    """Calibrated logits of one shift, image by image, as predict.py computes them."""
    size = int(model.hparams.image_size)
    transform = eval_transform(size, model.backbone.mean, model.backbone.std, model.backbone.interpolation)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        rows = [
            model.logits(transform(apply_shift(load_rgb(p, size), shift, severity, seed, i))[None])
            for i, (p, _) in enumerate(samples)
        ]
    model.train(was_training)
    return torch.cat(rows)


def test_batched_copies_match_image_by_image_and_workers(tiny):
    model, _, samples = tiny
    variants = shift_variants(["noise", "rotation", "jpeg"], clean=True)
    pred = predict_variants(model, samples, variants, seed=7, device="cpu", batch_size=20, num_workers=0)
    assert model.training  # left as found
    for k, (shift, sev) in enumerate(variants[1:], start=1):
        assert torch.allclose(pred.logits[k], _by_hand(model, samples, shift, sev, 7), atol=1e-5), (shift, sev)
    in_workers = predict_variants(model, samples, variants, seed=7, device="cpu", batch_size=20, num_workers=1)
    assert torch.allclose(pred.logits, in_workers.logits, atol=1e-6)
    other_seed = predict_variants(model, samples, variants[:2], seed=8, device="cpu", batch_size=20, num_workers=0)
    assert not torch.allclose(pred.logits[1], other_seed.logits[1])  # noise differs with the seed
    assert torch.allclose(pred.logits[0], other_seed.logits[0])  # the clean copy does not


def test_report_numbers_files_and_tensorboard(tiny, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    model, _, samples = tiny
    lines: list[str] = []
    writer = SummaryWriter(str(tmp_path / "tb"))
    report = run_shift_report(
        model, samples, model.class_names, tmp_path, list(SHIFT_NAMES), seed=0, device="cpu", batch_size=8,
        num_workers=0, clean_acc=None, writer=writer, announce=lines.append,
    )  # fmt: skip
    writer.close()
    n_variants = 2 * len(SHIFT_NAMES)
    expected = rf"shift report: {n_variants} shifted copies \(and the clean one\) of 12 test images, about \d+ s at "
    assert len(lines) == 1 and re.fullmatch(expected + r"[\d.]+ img/s", lines[0]), lines
    assert json.loads((tmp_path / "shift.json").read_text()) == report
    assert list(report["shifts"]) == [variant_name(s, sev) for s in SHIFT_NAMES for sev in SEVERITIES]
    assert report["temperature"] == pytest.approx(1.7) and report["images"] == 12

    with open(tmp_path / "shift_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == [p for p, _ in samples]
    for name, m in [("clean", report["clean"]), *report["shifts"].items()]:
        correct = sum(r[name] == r["target"] for r in rows)
        assert (m["count"], m["correct"]) == (12, correct), name
        assert m["acc"] == pytest.approx(correct / 12)
        assert m["acc_ci95"] == pytest.approx(list(wilson_interval(correct, 12)))
        if name != "clean":
            assert m["drop"] == pytest.approx(report["clean"]["acc"] - m["acc"])
    accs = [m["acc"] for m in report["shifts"].values()]
    assert report["shift_acc"] == pytest.approx(sum(accs) / len(accs))
    assert report["shift_ece"] == pytest.approx(sum(m["ece"] for m in report["shifts"].values()) / len(accs))
    targets = torch.tensor([label for _, label in samples])
    blurred = _by_hand(model, samples, "blur", 2, 0)  # ECE at the model's temperature (logits() applies it)
    assert report["shifts"]["blur-2"]["ece"] == pytest.approx(ece(blurred, targets, model.binary), abs=1e-6)

    table = (tmp_path / "shift.md").read_text()
    assert table.count("\n| ") == 2 + n_variants + 1 and "shift accuracy" in table and "JPEG quality 10" in table
    with Image.open(tmp_path / "shift.png") as chart:
        chart.load()
        assert chart.mode == "RGB" and chart.width > 300
    tags = scalar_tags(tmp_path / "tb")
    assert tags["shift/jpeg-2"][0][1] == pytest.approx(report["shifts"]["jpeg-2"]["acc"])
    assert {"shift/shift_acc", "shift/shift_ece"} <= set(tags)
    assert image_counts(tmp_path / "tb") == {"shift/chart": 1}


def test_a_given_clean_accuracy_is_the_baseline(tiny, tmp_path):
    model, _, samples = tiny
    report = run_shift_report(
        model, samples, model.class_names, tmp_path, ["jpeg"], seed=0, device="cpu", batch_size=4,
        num_workers=0, clean_acc=0.9, announce=None,
    )  # fmt: skip
    assert report["clean"] == {"source": "evaluation", "acc": 0.9}
    assert report["shifts"]["jpeg-1"]["drop"] == pytest.approx(0.9 - report["shifts"]["jpeg-1"]["acc"])
    assert report["mean_drop"] == pytest.approx(0.9 - report["shift_acc"])


def test_extra_test_folders(tiny, tmp_path):
    model, root, _ = tiny
    web = tmp_path / "web"
    shutil.copytree(root / "test", web)
    report = run_extra_tests(
        model, [f"web={web}"], model.class_names, tmp_path / "run", "cpu", batch_size=4, num_workers=0, clean_acc=0.5
    )
    m = report["tests"]["web"]
    assert m["count"] == 12 and m["acc_ci95"] == pytest.approx(list(wilson_interval(m["correct"], 12)))
    assert m["drop"] == pytest.approx(0.5 - m["acc"]) and m["ece"] is not None
    assert json.loads((tmp_path / "run" / "extra_tests.json").read_text()) == report
    assert check_extra_tests([f"web={web}"], model.class_names) == {"web": 12}

    odd = tmp_path / "odd"
    shutil.copytree(root / "test", odd)
    (odd / "dogs").rename(odd / "wolves")
    errors = {
        f"odd={odd}": r"odd=.* has class folders \['cats', 'wolves'\], the model's classes are \['cats', 'dogs'\]",
        f"gone={tmp_path / 'gone'}": "gone=.*: no such folder",
        "no-equals-sign": "must look like name=path",
    }
    for entry, message in errors.items():
        with pytest.raises(ConfigError, match=message) as err:
            run_extra_tests(model, [entry], model.class_names, tmp_path / "run", "cpu", 4, 0)
        assert "\n" not in str(err.value)


def test_every_shift_has_two_increasing_levels_written_once():
    assert set(SHIFT_NAMES) == {"lowres", "jpeg", "blur", "noise", "brightness", "contrast", "grayscale", "rotation"}
    for shift in SHIFTS.values():
        assert len(shift.levels) == len(SEVERITIES) and shift.levels[0] != shift.levels[1]
