"""Intervals, the paired McNemar test, summaries over repeats and temperature scaling."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.calibration import ece, fit_temperature, nll
from pipeline.studies.statistics import mcnemar, mean_sd_interval, t_quantile_975, wilson_interval


def test_wilson_interval_contains_the_estimate_and_shrinks_with_more_images():
    widths = []
    for n in (50, 200, 1000, 10000):
        low, high = wilson_interval(round(0.9 * n), n)
        assert low < 0.9 < high
        widths.append(high - low)
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 5
    # 1,000 images at 99%: the README's "about +-0.6 points"
    low, high = wilson_interval(990, 1000)
    assert 0.981 < low < 0.983 and 0.994 < high < 0.996
    # never outside [0, 1], and not empty at 100%
    low, high = wilson_interval(20, 20)
    assert high == 1.0 and 0.8 < low < 0.9


def test_wilson_interval_refuses_impossible_counts():
    with pytest.raises(ValueError, match="between 0 and total"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="at least one"):
        wilson_interval(0, 0)


def test_mcnemar_exact_p_values():
    # 10 discordant images, all won by A: p = 2 * 0.5**10
    a = [True] * 10 + [True] * 90
    b = [False] * 10 + [True] * 90
    result = mcnemar(a, b)
    assert (result["a_only"], result["b_only"], result["n"]) == (10, 0, 100)
    assert result["p_value"] == pytest.approx(2 / 1024)
    # 6 vs 2 discordant: 2 * P(Bin(8, .5) <= 2) = 2 * (1 + 8 + 28) / 256
    a = [True] * 6 + [False] * 2 + [True] * 50
    b = [False] * 6 + [True] * 2 + [True] * 50
    assert mcnemar(a, b)["p_value"] == pytest.approx(74 / 256)
    # identical predictions: no evidence of a difference
    assert mcnemar(a, a)["p_value"] == 1.0
    with pytest.raises(ValueError, match="same images"):
        mcnemar([True], [True, False])


def test_mean_sd_interval_of_repeats():
    summary = mean_sd_interval([0.90, 0.92, 0.94])
    assert summary["mean"] == pytest.approx(0.92) and summary["sd"] == pytest.approx(0.02)
    half = 4.303 * 0.02 / math.sqrt(3)
    assert summary["ci95"] == pytest.approx([0.92 - half, 0.92 + half])
    single = mean_sd_interval([0.9])
    assert single["sd"] is None and single["ci95"] is None
    assert t_quantile_975(1000) == pytest.approx(1.96, abs=1e-3)


def _over_confident(n: int = 4000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a model that is right ~80% of the time but says 99%: calibrated logits times 5."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 2, (n,), generator=g)
    correct = torch.rand(n, generator=g) < 0.8
    sign = torch.where(correct, 2 * targets - 1, 1 - 2 * targets).float()
    logits = sign * math.log(0.8 / 0.2) * 5 + 0.3 * torch.randn(n, generator=g)
    return logits.view(-1, 1), targets


def test_temperature_scaling_lowers_the_ece_of_an_over_confident_model():
    logits, targets = _over_confident()
    t = fit_temperature(logits, targets, binary=True)
    assert 3.5 < t < 6.5  # the inflation factor was 5
    before, after = ece(logits, targets, True), ece(logits, targets, True, t)
    assert before > 0.15 and after < 0.03
    assert nll(logits, targets, True, t) < nll(logits, targets, True)
    # argmax is unchanged
    assert torch.equal(logits > 0, logits / t > 0)


def test_temperature_scaling_multiclass():
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, 4, (3000,), generator=g)
    logits = torch.randn(3000, 4, generator=g)
    logits[torch.arange(3000), targets] += 1.0
    hot = logits * 6
    t = fit_temperature(hot, targets, binary=False)
    assert t > 3
    assert ece(hot, targets, False, t) < ece(hot, targets, False) / 3


def test_compare_two_runs_by_their_test_predictions(tmp_path, capsys):
    from pipeline.studies.compare import main

    header = "file,target,predicted,prob_a,prob_b\n"
    rows_a = [f"f{i}.png,a,{'a' if i < 18 else 'b'},0.9,0.1\n" for i in range(20)]  # 18 right
    rows_b = [f"f{i}.png,a,{'a' if i >= 6 else 'b'},0.9,0.1\n" for i in range(20)]  # 14 right
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "test_predictions.csv").write_text(header + "".join(rows_a))
    (tmp_path / "b.csv").write_text(header + "".join(rows_b))
    assert main([str(tmp_path / "A"), str(tmp_path / "b.csv")]) == 0
    out = capsys.readouterr().out
    # A-only: f0..f5 (6), B-only: f18, f19 (2): p = 2 * (1 + 8 + 28) / 256
    assert "A right / B wrong 6, B right / A wrong 2" in out and f"p = {74 / 256:.3g}" in out
    (tmp_path / "c.csv").write_text(header + rows_a[0])
    assert main([str(tmp_path / "A"), str(tmp_path / "c.csv")]) == 2
    assert "different images" in capsys.readouterr().err
