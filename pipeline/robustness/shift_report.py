"""The shift report: how the evaluated model holds up when its test images are damaged, and on test
folders from elsewhere (``eval.extra_tests``).

The copies and their metrics are computed in ``pipeline/inference.py`` and drawn in
``pipeline/robustness/shift_views.py``. Per copy: accuracy with its 95% Wilson interval, ECE (at the model's
temperature: ``model.logits`` divides by it) and the drop from the clean accuracy; their mean is
the "shift accuracy". Written as ``shift.json`` (= the returned dict, for ``metrics.json["shift"]``),
``shift.md``, ``shift.png`` and ``shift_predictions.csv`` (each image's prediction under each copy).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from core.atomic_io import json_text
from core.errors import ConfigError
from datamodules.flat_folder import list_flat
from datamodules.image_folder import default_num_workers
from datamodules.layout import DataLayoutError
from datamodules.shifts import SHIFT_NAMES, SHIFTS
from lightning_modules.figures import png_bytes
from lightning_modules.tensorboard_views import tensorboard_writer
from pipeline.config.schema import SHIFT_PRESETS
from pipeline.inference import (
    CLEAN,
    cost_line,
    predict_variants,
    shift_variants,
    split_metrics,
    summarise_shifts,
)
from pipeline.robustness.shift_views import (
    extra_tests_table,
    log_shift_report,
    predictions_csv,
    shift_chart,
    shift_rows,
    shift_table,
)
from pipeline.runner.run_dir import RunFolder
from pipeline.runner.trainer_factory import on_gpu

SHIFT_FILES = {"json": "shift.json", "table": "shift.md", "chart": "shift.png", "predictions": "shift_predictions.csv"}
EXTRA_FILES = {"json": "extra_tests.json", "table": "extra_tests.md", "predictions": "extra_tests_predictions.csv"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # extra test names become JSON keys and TensorBoard tags


# --- configuration ------------------------------------------------------------------------------
def resolve_shifts(value: Any, on_gpu: bool) -> list[str]:
    """``eval.shifts`` as a list of shift names: ``auto`` = all on a GPU and none on CPU (16 extra
    passes over the test set are minutes there), ``all``, ``none``/null, one name, ``a,b`` or a list."""
    if value is None:
        return []
    if isinstance(value, str):
        if value in SHIFT_PRESETS:
            return list(SHIFT_NAMES) if value == "all" or (value == "auto" and on_gpu) else []
        value = [v.strip() for v in value.split(",") if v.strip()]
    names = [str(v) for v in value]
    unknown = [n for n in names if n not in SHIFTS]
    if unknown:
        raise ConfigError(
            f"eval.shifts: unknown shift {unknown[0]!r}; use {' | '.join(SHIFT_PRESETS)} or a list of: "
            f"{', '.join(SHIFT_NAMES)}"
        )
    return list(dict.fromkeys(names))  # duplicates once, in the given order


def parse_extra_tests(entries: Sequence[str] | None) -> dict[str, Path]:
    """``eval.extra_tests`` (``["name=path", ...]``) as ``{name: folder}``; a bad entry or a missing
    folder is a one-line ConfigError."""
    out: dict[str, Path] = {}
    for entry in entries or []:
        name, sep, path = str(entry).partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ConfigError(f"eval.extra_tests: {entry!r} must look like name=path")
        if not _NAME.match(name) or name == CLEAN:
            raise ConfigError(f"eval.extra_tests: name {name!r} must be letters, digits, '_', '.' or '-' (not clean)")
        if name in out:
            raise ConfigError(f"eval.extra_tests: the name {name!r} is given twice")
        if not Path(path).is_dir():
            raise ConfigError(f"eval.extra_tests: {name}={path}: no such folder (expected <path>/<class>/<images>)")
        out[name] = Path(path)
    return out


def validate_shift_config(eval_cfg: Any) -> None:
    """What ``pipeline.config.load.validate`` can check before any work: shift names, extra test entries."""
    resolve_shifts(eval_cfg.shifts, on_gpu=True)
    parse_extra_tests(eval_cfg.extra_tests)


def extra_test_samples(name: str, path: str | Path, class_names: Sequence[str]) -> list[tuple[str, int]]:
    """The ``(path, label)`` images of ``<path>/<class>/``; its class folders must be the model's."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"eval.extra_tests: {name}={path}: no such folder (expected <path>/<class>/<images>)")
    try:
        classes, files, _ = list_flat(root)
    except DataLayoutError as err:
        raise ConfigError(f"eval.extra_tests: {name}={path}: {err}") from None
    if classes != list(class_names):
        raise ConfigError(
            f"eval.extra_tests: {name}={path} has class folders {classes}, the model's classes are {list(class_names)}"
        )
    return [(str(root / f), label) for label, c in enumerate(classes) for f in files[c]]


def check_extra_tests(entries: Sequence[str] | None, class_names: Sequence[str]) -> dict[str, int]:
    """Fail early (before training) on any bad extra test folder; returns the image count of each."""
    return {name: len(extra_test_samples(name, path, class_names)) for name, path in parse_extra_tests(entries).items()}


def _json_clean(report: dict[str, Any]) -> dict[str, Any]:
    """The dict exactly as its JSON file reads back (lists, no NaN), so the two never differ."""
    return json.loads(json_text(report))


def run_shift_report(
    model,
    samples: list[tuple[str, int]],
    class_names: list[str],
    run_dir: str | Path,
    shifts: Sequence[str],
    seed: int,
    device: torch.device | str,
    batch_size: int,
    num_workers: int,
    clean_acc: float | None,
    writer=None,
    announce: Callable[[str], None] | None = rank_zero_info,
) -> dict[str, Any]:
    """The shift report of ``model`` (a TransferClassifier) on ``samples`` (the test split): writes
    the files in ``run_dir`` (the caller is global rank zero), logs to ``writer`` and returns the
    dict for ``metrics.json["shift"]``.
    ``clean_acc`` None: the clean copy is evaluated here too. ``announce`` gets the cost line,
    estimated on the first batch."""
    if not shifts:
        raise ValueError("run_shift_report needs at least one shift")
    resolve_shifts(list(shifts), on_gpu=True)
    run = RunFolder(run_dir)
    clean = clean_acc is None
    variants = shift_variants(shifts, clean=clean)
    copies = len(variants) - int(clean)

    def first_batch(rate: float) -> None:
        if announce is not None:
            announce(cost_line(len(samples), copies, rate, clean))

    pred = predict_variants(
        model, samples, variants, seed, device, batch_size, num_workers, first_batch, progress="shift report"
    )
    report = summarise_shifts(pred, model.binary, clean_acc, seed, float(model.temperature))
    report["files"] = dict(SHIFT_FILES)
    report = _json_clean(report)
    run.write_text(SHIFT_FILES["json"], json_text(report))
    run.write_text(SHIFT_FILES["table"], shift_table(report))
    run.write_bytes(SHIFT_FILES["chart"], png_bytes(shift_chart(report)))
    rows = shift_rows(samples, class_names, pred, model.binary)
    run.write_text(SHIFT_FILES["predictions"], predictions_csv(rows))
    log_shift_report(writer, report)
    return report


# --- extra test folders ---------------------------------------------------------------------------
def run_extra_tests(
    model,
    extra_tests: Sequence[str],
    class_names: list[str],
    run_dir: str | Path,
    device: torch.device | str,
    batch_size: int,
    num_workers: int,
    clean_acc: float | None = None,
    writer=None,
) -> dict[str, Any]:
    """Accuracy (95% interval), ECE and the drop from ``clean_acc`` on each ``eval.extra_tests``
    folder; writes ``extra_tests.{json,md}`` and the per-image predictions, logs
    ``extra_test/<name>`` (accuracy) and ``extra_test/<name>_ece``; returns the JSON's dict."""
    run = RunFolder(run_dir)
    tests: dict[str, Any] = {}
    rows = [["test", "file", "target", "predicted"]]
    for name, path in parse_extra_tests(extra_tests).items():
        samples = extra_test_samples(name, path, class_names)
        pred = predict_variants(
            model, samples, [(CLEAN, 0)], 0, device, batch_size, num_workers, progress=f"extra test {name}"
        )
        keep = pred.readable
        metrics = split_metrics(pred.logits[0][keep], pred.targets[keep], model.binary)
        drop = clean_acc - metrics["acc"] if clean_acc is not None and metrics["acc"] is not None else None
        tests[name] = {"path": str(path), **metrics, "drop": drop, "unreadable": int((~keep).sum())}
        rows += [[name, *row] for row in shift_rows(samples, class_names, pred, model.binary)[1:]]
    report = _json_clean({"test_acc": clean_acc, "tests": tests, "files": dict(EXTRA_FILES)})
    run.write_text(EXTRA_FILES["json"], json_text(report))
    run.write_text(EXTRA_FILES["table"], extra_tests_table(report))
    run.write_text(EXTRA_FILES["predictions"], predictions_csv(rows))
    if writer is not None:
        for name, m in report["tests"].items():
            if m["acc"] is not None:
                writer.add_scalar(f"extra_test/{name}", m["acc"], 0)
                writer.add_scalar(f"extra_test/{name}_ece", m["ece"], 0)
    return report


# --- the runner's entry point -------------------------------------------------------------------
def report_robustness(
    cfg, trainer, model, samples: list[tuple[str, int]], run_dir: Path, clean_acc: float | None
) -> dict[str, Any]:
    """The shift report and the extra test folders of the evaluated (calibrated) model, on global
    rank zero while the other ranks wait; the entries for metrics.json (``shift``, ``extra_tests``)."""
    gpu = on_gpu(cfg)
    shifts = resolve_shifts(cfg.eval.shifts, gpu)
    if not shifts and cfg.eval.shifts == "auto":
        rank_zero_info(
            f"shift report: off on CPU (eval.shifts=auto); eval.shifts=all evaluates {len(SHIFT_NAMES) * 2} "
            "shifted copies of the test split"
        )
    out: dict[str, Any] = {}
    if (shifts or cfg.eval.extra_tests) and trainer.is_global_zero:
        device = torch.device("cuda" if gpu else "cpu")
        workers = cfg.data.num_workers if cfg.data.num_workers is not None else default_num_workers()
        writer = tensorboard_writer(trainer)
        inputs, model.inputs = model.inputs, "images"  # a features-stage model: the whole image path
        try:
            if shifts:
                out["shift"] = run_shift_report(
                    model,
                    samples,
                    model.class_names,
                    run_dir,
                    shifts,
                    cfg.eval.shift_seed,
                    device,
                    cfg.data.batch_size,
                    workers,
                    clean_acc,
                    writer,
                )
            if cfg.eval.extra_tests:
                out["extra_tests"] = run_extra_tests(
                    model,
                    list(cfg.eval.extra_tests),
                    model.class_names,
                    run_dir,
                    device,
                    cfg.data.batch_size,
                    workers,
                    clean_acc,
                    writer,
                )
        finally:
            model.inputs = inputs
    trainer.strategy.barrier("robustness reports")
    return out


def shift_accuracy(cfg, trainer, model, samples: list[tuple[str, int]]) -> float | None:
    """Only the mean accuracy under ``eval.shifts`` (no files): WiSE-FT's curve reports it per mixing
    weight. Global rank zero computes it; the other ranks get None."""
    gpu = on_gpu(cfg)
    shifts = resolve_shifts(cfg.eval.shifts, gpu)
    if not shifts or not trainer.is_global_zero:
        return None
    device = torch.device("cuda" if gpu else "cpu")
    workers = cfg.data.num_workers if cfg.data.num_workers is not None else default_num_workers()
    inputs, model.inputs = model.inputs, "images"
    try:
        variants = shift_variants(shifts)
        pred = predict_variants(model, samples, variants, cfg.eval.shift_seed, device, cfg.data.batch_size, workers)
    finally:
        model.inputs = inputs
    return summarise_shifts(pred, model.binary, None, cfg.eval.shift_seed, float(model.temperature))["shift_acc"]
