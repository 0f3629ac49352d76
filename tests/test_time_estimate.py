"""The early forecast of a long run: its arithmetic, when it speaks, and the faster-backbone hint."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import lightning_modules.time_estimate as time_estimate
from lightning_modules.time_estimate import MEASURE_STEPS, TimeEstimate


def _run(monkeypatch, estimate: TimeEstimate, seconds_per_step: float) -> None:
    now = {"t": 0.0}
    monkeypatch.setattr(time_estimate.time, "perf_counter", lambda: now["t"])
    trainer = SimpleNamespace(num_training_batches=100, num_val_batches=[30])
    for batch_idx in range(MEASURE_STEPS + 3):
        estimate.on_train_batch_start(trainer, None, None, batch_idx)
        now["t"] += seconds_per_step  # the step itself
        estimate.on_train_batch_end(trainer, None, None, None, batch_idx)


def test_a_long_cpu_run_is_forecast_once_with_a_faster_backbone(monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    estimate = TimeEstimate("vgg16", 150, epochs=30, on_cpu=True)
    _run(monkeypatch, estimate, seconds_per_step=0.5)
    lines = [r.getMessage() for r in caplog.records if "min per epoch" in r.getMessage()]
    assert len(lines) == 1
    # 0.5 s x 100 steps + 0.5 / 3 s x 30 validation batches = 55 s = 0.9 min per epoch; 30 epochs = 28 min
    assert "vgg16 at 150 px on this CPU: about 0.9 min per epoch, 28 min for the stage's 30 epochs" in lines[0]
    assert "model.backbone=efficientnet_lite0 is faster here" in lines[0]
    _run(monkeypatch, estimate, seconds_per_step=0.5)  # a later phase: nothing more
    assert len([r for r in caplog.records if "min per epoch" in r.getMessage()]) == 1


def test_short_runs_and_resumed_runs_say_nothing(monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    _run(monkeypatch, TimeEstimate("resnet18", 32, epochs=3, on_cpu=True), seconds_per_step=0.01)
    _run(monkeypatch, TimeEstimate("vgg16", 150, epochs=30, on_cpu=True, done=True), seconds_per_step=0.5)
    assert not [r for r in caplog.records if "min per epoch" in r.getMessage()]
