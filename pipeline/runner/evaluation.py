"""The final evaluation of a run: metrics with intervals, temperature scaling, per-image predictions.

After fitting, the best checkpoint is evaluated on validation and test once, keeping every
image's logits; a temperature fitted on the validation logits is stored in that checkpoint, and
the reported loss and ECE are those of the calibrated model, i.e. what ``stage=test`` and
``predict.py`` give for the checkpoint afterwards (accuracy, F1 and AUROC do not depend on it).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.utilities import rank_zero_info

from core.atomic_io import write_bytes_atomic, write_text_atomic
from lightning_modules.calibration import (
    ECE_BINS,
    T_RANGE,
    ece,
    fit_temperature,
    judge_temperature,
    nll,
    to_probabilities,
)
from lightning_modules.eval_outputs import CollectOutputs
from lightning_modules.figures import as_tensor, png_bytes, reliability_diagram
from lightning_modules.run_safety import AtomicCheckpointIO
from lightning_modules.tensorboard_views import tensorboard_writer
from pipeline.runner.trainer_factory import intended_warnings
from pipeline.studies.statistics import mcnemar, wilson_interval

METRIC_KEYS = ("acc", "loss", "f1", "auroc", "ece", "count")
INTERVALS = "acc_ci95: 95% Wilson score interval of the accuracy over the split's images"
CallbackT = TypeVar("CallbackT", bound=Callback)


@dataclass
class Evaluation:
    val: dict[str, Any] | None
    test: dict[str, Any] | None
    best: str | None  # the evaluated checkpoint (None: the final weights, checkpointing off)
    calibration: dict[str, Any] | None
    test_predictions: tuple[torch.Tensor, torch.Tensor] | None  # calibrated logits, targets


def summarise(results: list[dict[str, float]], prefix: str) -> dict[str, Any] | None:
    """One split's logged metrics, with the accuracy's 95% interval."""
    if not results:
        return None
    row = results[0]
    out: dict[str, Any] = {k: float(row[f"{prefix}/{k}"]) for k in METRIC_KEYS if f"{prefix}/{k}" in row}
    if "count" in out:
        out["count"] = int(round(out["count"]))
        if "acc" in out and out["count"] > 0:
            out["acc_ci95"] = list(wilson_interval(round(out["acc"] * out["count"]), out["count"]))
    return out


def evaluate_best(
    trainer: Trainer, model, datamodule, run_dir: Path, temperature: str = "auto", best: str | None = None
) -> Evaluation:
    """Validation and test metrics of the best checkpoint (by validation accuracy), or of the
    final weights when checkpointing is off; then temperature scaling (see module docstring)."""
    if best is None:  # the checkpoint callback's best, unless the caller chose one (WiSE-FT)
        best = best_checkpoint(trainer)
    if best is None:
        rank_zero_info("no best checkpoint (checkpointing off or no validation): evaluating the final weights")
    with attached(trainer, CollectOutputs()) as collected, intended_warnings():
        val = summarise(trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False), "val")
        test = summarise(trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False), "test")
    val_pred, test_pred = collected.outputs.get("val"), collected.outputs.get("test")
    calibration = calibrate(model, val_pred, test_pred, val, test, temperature)
    if calibration is not None:
        stored = best or str(run_dir / "checkpoints" / "last.ckpt")
        if trainer.is_global_zero:
            store_temperature(stored, calibration["temperature"])
            _log_reliability(trainer, run_dir, model.binary, test_pred, calibration["temperature"])
        trainer.strategy.barrier("temperature stored")
        calibration["stored_in"] = stored
        if test_pred is not None:
            test_pred = (test_pred[0] / calibration["temperature"], test_pred[1])
    return Evaluation(val, test, best, calibration, test_pred)


@contextlib.contextmanager
def attached(trainer: Trainer, callback: CallbackT) -> Iterator[CallbackT]:
    """``callback`` among ``trainer``'s callbacks for the block's evaluations (the fit's trainer
    is reused, without it)."""
    trainer.callbacks.append(callback)
    try:
        yield callback
    finally:
        trainer.callbacks.remove(callback)


def best_checkpoint(trainer: Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    return (callback.best_model_path or None) if callback is not None else None


def calibrate(
    model, val_pred, test_pred, val: dict | None, test: dict | None, mode: str = "auto"
) -> dict[str, Any] | None:
    """Fit the temperature on the validation logits and decide whether to keep it (``mode``: auto =
    ``judge_temperature``'s rule, fit = any finite fit, clamped to ``T_RANGE``, off = T=1); set it on
    ``model`` and report loss and ECE before (``*_uncalibrated``) and after for both splits."""
    if val_pred is None or len(val_pred[1]) == 0:
        rank_zero_info("no validation predictions: temperature scaling skipped (the model stays uncalibrated)")
        return None
    fitted = fit_temperature(val_pred[0], val_pred[1], model.binary) if mode != "off" else 1.0
    reason = judge_temperature(val_pred[0], val_pred[1], model.binary, fitted) if mode == "auto" else None
    if mode == "fit":  # the user's choice: any fit, clamped to the range; only a failed fit is refused
        if math.isfinite(fitted):
            fitted = min(T_RANGE[1], max(T_RANGE[0], fitted))
        else:
            reason = "the fit failed (T is not a finite number)"
    if mode == "off":
        reason = "eval.temperature=off"
    temperature = 1.0 if reason else fitted
    model.temperature.fill_(temperature)
    for pred, metrics in ((val_pred, val), (test_pred, test)):
        if pred is None or metrics is None:
            continue
        logits, targets = pred
        metrics["loss_uncalibrated"] = nll(logits, targets, model.binary)
        metrics["ece_uncalibrated"] = ece(logits, targets, model.binary)
        metrics["loss"] = nll(logits, targets, model.binary, temperature)
        metrics["ece"] = ece(logits, targets, model.binary, temperature)
    if reason:
        rank_zero_info(f"temperature scaling: T=1 kept (fitted T={fitted:.3g} not used: {reason})")
    else:
        rank_zero_info(
            f"temperature scaling: T={temperature:.3f} (fitted on validation); ECE val "
            f"{val['ece_uncalibrated']:.4f} -> {val['ece']:.4f}"
            + (f", test {test['ece_uncalibrated']:.4f} -> {test['ece']:.4f}" if test and "ece" in test else "")
        )
    return {
        "temperature": temperature,
        "fitted_temperature": fitted if math.isfinite(fitted) else None,
        "kept": reason is None,
        "reason": reason,
        "mode": mode,
        "fitted_on": "val",
        "method": "temperature scaling",
        "ece_bins": ECE_BINS,
    }


def store_temperature(path: str | Path, temperature: float) -> None:
    """Write the fitted temperature into a checkpoint file (atomically)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["state_dict"]["temperature"] = torch.tensor(float(temperature))
    AtomicCheckpointIO().save_checkpoint(ckpt, path)


def _log_reliability(trainer: Trainer, run_dir: Path, binary: bool, test_pred, temperature: float) -> None:
    """Reliability diagram of the test split before and after scaling: PNG and TensorBoard."""
    if test_pred is None or len(test_pred[1]) == 0:
        return
    logits, targets = test_pred
    before = to_probabilities(logits, binary)
    after = to_probabilities(logits / temperature, binary)
    title = f"reliability of the test split ({len(targets)} images, {ECE_BINS} bins), temperature T={temperature:.2f}"
    image = reliability_diagram(before, after, targets, binary, ECE_BINS, title)
    write_bytes_atomic(run_dir / "reliability_test.png", png_bytes(image))
    writer = tensorboard_writer(trainer)
    if writer is not None:
        writer.add_image("test/reliability", as_tensor(image))


def write_predictions(path: Path, files: list[str], class_names: list[str], binary: bool, predictions) -> None:
    """``test_predictions.csv``: one row per test image (file, target, prediction, probabilities),
    the per-image record that paired comparisons (McNemar) and error analysis need."""
    logits, targets = predictions
    if len(files) != len(targets):
        raise RuntimeError(f"{len(targets)} test predictions for {len(files)} test files")
    probs = to_probabilities(logits, binary)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["file", "target", "predicted", *[f"prob_{c}" for c in class_names]])
    for file, target, p in zip(files, targets.tolist(), probs.tolist()):
        predicted = max(range(len(p)), key=p.__getitem__)
        writer.writerow([file, class_names[target], class_names[predicted], *[f"{x:.6f}" for x in p]])
    write_text_atomic(path, out.getvalue())  # a file name that is not UTF-8 keeps its original bytes


def read_correct(path: str | Path) -> dict[str, bool]:
    """``{file: predicted == target}`` from a ``test_predictions.csv``."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:  # names as written
        return {row["file"]: row["predicted"] == row["target"] for row in csv.DictReader(f)}


def paired_mcnemar(correct_a: dict[str, bool], correct_b: dict[str, bool], what: str = "the two runs") -> dict:
    """The exact McNemar test of two ``read_correct`` results, paired by file."""
    if set(correct_a) != set(correct_b):
        raise ValueError(f"{what} were tested on different images ({len(correct_a)} vs {len(correct_b)} files)")
    files = sorted(correct_a)
    return mcnemar([correct_a[f] for f in files], [correct_b[f] for f in files])
