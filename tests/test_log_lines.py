"""A run whose output goes to a file reads well: a line per epoch, a line per ~10% of a long loop,
no progress-bar redraws; metrics.csv holds the epochs' numbers that TensorBoard shows."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import predict

from conftest import ROOT, finetune_args
from helpers import run_dir, run_train, scalar_tags

EPOCH_LINE = re.compile(
    r"^epoch (\d+)/3  phase \d  train loss [\d.]+  val loss [\d.]+  val acc [\d.]+%  images/s [\d.]+  "
    r"elapsed \d\d:\d\d  remaining \d\d:\d\d$"
)


def _redirected(tmp_path: Path, script: str, args: list[str]) -> str:
    """``script args > file 2>&1``: its output as a file holds it."""
    env = {k: v for k, v in os.environ.items() if k != "TRANSFER_RUN_DIR"}
    log = tmp_path / f"{Path(script).stem}.log"
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, str(ROOT / script), *args], cwd=tmp_path, env=env, stdout=out, stderr=out
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def test_a_redirected_run_writes_a_line_per_epoch(toy_root, tmp_path):
    # the progress bar is left to the run (fast_args turns it off): off a terminal it must be off
    args = [a for a in finetune_args(toy_root, tmp_path / "out") if "enable_progress_bar" not in a]
    text = _redirected(tmp_path, "train.py", args)
    assert "\r" not in text and len(text) < 8000, text
    epochs = [int(m[1]) for line in text.splitlines() if (m := EPOCH_LINE.match(line))]
    assert epochs == [1, 2, 3], text
    assert "evaluation (" not in text  # loops shorter than core.progress.QUIET_S print nothing


def test_predict_off_a_terminal_prints_progress_lines(trained_ckpt, toy_root, tmp_path, monkeypatch, capsys):
    """predict.py's stderr is not a terminal here (captured): lines with images/s and the time left,
    as a redirected run prints them (this loop is short: every loop counts as long)."""
    from core import progress

    monkeypatch.setattr(progress, "QUIET_S", 0.0)
    predict.main([f"ckpt_path={trained_ckpt}", f"inputs={toy_root / 'test'}", f"output={tmp_path / 'p.csv'}"])
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = re.findall(r"^predict: (\d+)/16 images \(\d+%\), [\d.]+ images/s, elapsed .*, remaining .*$", err, re.M)
    assert lines and lines[-1] == "16", err


def test_progress_lines_every_tenth(monkeypatch, capsys):
    from core import progress

    monkeypatch.setattr(progress, "QUIET_S", 0.0)
    with progress.Progress(100, "loop") as bar:
        for _ in range(50):
            bar.update(2)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("loop: 100/100 images (100%)"), lines


def test_metrics_csv_matches_tensorboard(toy_root, tmp_path):
    out = run_dir(run_train(finetune_args(toy_root, tmp_path / "out")))
    with (out / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2] and [r["phase"] for r in rows] == ["0", "1", "1"]
    scalars = scalar_tags(out)
    for column, tag in (("train_loss", "train/loss_epoch"), ("val_loss", "val/loss"), ("val_acc", "val/acc")):
        fitted = [v for _, v in scalars[tag]][:3]  # after them: the best model's evaluation
        assert [float(r[column]) for r in rows] == pytest.approx(fitted, rel=1e-6), column
    # a learning rate: the one TensorBoard shows at the epoch's last step
    steps_per_epoch = scalars["val/acc"][0][0]
    for group in ("head", "block4"):
        by_step = dict(scalars[f"lr/{group}"])
        expected = [by_step[(e + 1) * steps_per_epoch - 1] for e in range(3)]
        assert [float(r[f"lr/{group}"]) for r in rows] == pytest.approx(expected, rel=1e-6), group
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    # the per-epoch plots' tags, against the epoch; the HParams table reads val/* and test/* (no hparams/* copies)
    assert [s for s, _ in scalars["epoch/val_acc"]] == [0, 1, 2]
    assert [v for _, v in scalars["epoch/train_loss"]] == pytest.approx([float(r["train_loss"]) for r in rows])
    assert not [tag for tag in scalars if tag.startswith("hparams/")]


def test_reliability_diagram_has_one_panel_when_temperature_is_one():
    from lightning_modules.figures import reliability_diagram

    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])
    targets = torch.tensor([0, 1, 0])
    one = reliability_diagram(probs, probs, targets, True, 15, "T=1")
    two = reliability_diagram(probs, probs.flip(1), targets, True, 15, "T=2")
    assert one.width < two.width and one.height == two.height
