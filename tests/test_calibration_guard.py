"""Temperature scaling cannot make calibration worse: a fit is kept only when validation supports
it and it lowers the validation NLL without raising the validation ECE; otherwise T=1 with the reason."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.calibration import MIN_VAL_ERRORS, MIN_VAL_IMAGES, ece, fit_temperature, judge_temperature
from pipeline.runner.evaluation import calibrate


class _Model:
    binary = True

    def __init__(self):
        self.temperature = torch.ones(())


def _over_confident(n: int, accuracy: float = 0.8, inflate: float = 5.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 2, (n,), generator=g)
    correct = torch.rand(n, generator=g) < accuracy
    sign = torch.where(correct, 2 * targets - 1, 1 - 2 * targets).float()
    logits = sign * math.log(accuracy / (1 - accuracy)) * inflate + 0.3 * torch.randn(n, generator=g)
    return logits.view(-1, 1), targets


def test_a_supported_fit_that_helps_is_kept():
    logits, targets = _over_confident(2000)
    t = fit_temperature(logits, targets, True)
    assert judge_temperature(logits, targets, True, t) is None
    report = calibrate(_Model(), (logits, targets), None, {}, None)
    assert report["kept"] and report["temperature"] == pytest.approx(t) and report["reason"] is None


def test_a_small_validation_set_keeps_t_1():
    logits, targets = _over_confident(60)
    model = _Model()
    val: dict = {}
    report = calibrate(model, (logits, targets), None, val, None)
    assert not report["kept"] and report["temperature"] == 1.0 and float(model.temperature) == 1.0
    assert f"at least {MIN_VAL_IMAGES}" in report["reason"]
    assert val["ece"] == val["ece_uncalibrated"]  # reported figures are those of T=1


def test_too_few_errors_keeps_t_1():
    logits, targets = _over_confident(500, accuracy=0.995)
    predicted = (logits.reshape(-1) > 0).long()
    assert int((predicted != targets).sum()) < MIN_VAL_ERRORS
    t = fit_temperature(logits, targets, True)
    assert "errors" in judge_temperature(logits, targets, True, t)


def test_a_separable_validation_set_is_refused():
    targets = torch.arange(400) % 2
    logits = ((2 * targets - 1) * 3.0).float().view(-1, 1)  # every image right with a margin
    t = fit_temperature(logits, targets, True)
    assert t < 0.5  # the NLL falls as T falls: the fit sharpens until its tolerance stops it
    assert "400 images and 0 errors" in judge_temperature(logits, targets, True, t)
    # a fit that ran to the end of the range is named as such whatever the split
    many, labels = _over_confident(2000)
    assert "outside" in judge_temperature(many, labels, True, 0.01)
    assert "outside" in judge_temperature(many, labels, True, 50.0)


def test_a_failed_fit_is_named():
    logits, targets = _over_confident(400)
    assert "not a finite number" in judge_temperature(logits, targets, True, float("nan"))
    report = calibrate(_Model(), (logits, targets), None, {}, None, mode="fit")
    assert report["kept"]  # mode=fit keeps any finite fit inside the range


def test_a_fit_that_raises_the_ece_is_refused():
    """Lower NLL, higher ECE: a calibrated bulk plus a few confident errors. NLL wants T > 1 for
    the errors, which makes the bulk under-confident; only the ECE guard sees it."""
    g = torch.Generator().manual_seed(3)
    n = 1000
    targets = torch.randint(0, 2, (n,), generator=g)
    sign = (2 * targets - 1).float()
    logits = sign * 2.5  # right, p=0.924
    wrong = torch.rand(n, generator=g) < 0.076  # calibrated: 7.6% wrong at p=0.924
    logits[wrong] = -sign[wrong] * 2.5
    worst = torch.rand(n, generator=g) < 0.02  # and 2% confidently wrong
    logits[worst] = -sign[worst] * 9.0
    logits = logits.view(-1, 1)
    t = fit_temperature(logits, targets, True)
    assert ece(logits, targets, True, t) > ece(logits, targets, True)
    reason = judge_temperature(logits, targets, True, t)
    assert reason is not None and "ECE" in reason


def test_off_is_t_1_without_a_fit():
    logits, targets = _over_confident(2000)
    report = calibrate(_Model(), (logits, targets), None, {}, None, mode="off")
    assert report["temperature"] == 1.0 and report["reason"] == "eval.temperature=off"
