"""The shift report: how the evaluated model holds up when its test images are damaged, and on test
folders from elsewhere (``eval.extra_tests``).

Every test image is decoded once and passed through the usual evaluation transform in several
copies: each shift of ``datamodules.shifts`` at each severity (plus the clean image when no clean
accuracy is given). Per copy: accuracy with its 95% Wilson interval, ECE (at the model's
temperature: ``model.logits`` divides by it) and the drop from the clean accuracy; their mean is
the "shift accuracy". Written as ``shift.json`` (= the returned dict, for ``metrics.json["shift"]``),
``shift.md``, ``shift.png`` and ``shift_predictions.csv`` (each image's prediction under each copy).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from datamodules.flat_folder import list_flat
from datamodules.image_folder import CPU_EVAL_BATCH, DataLayoutError, default_num_workers
from datamodules.image_io import load_rgb
from datamodules.shifts import SEVERITIES, SHIFT_NAMES, SHIFTS, apply_shift, variant_name
from datamodules.transforms import eval_transform
from lightning_modules.atomic_io import atomic_target, json_text, write_text_atomic
from lightning_modules.calibration import ece, to_probabilities
from lightning_modules.figures import _font
from lightning_modules.tensorboard_views import tensorboard_writer
from pipeline.config import ConfigError
from pipeline.statistics import wilson_interval
from pipeline.trainer_factory import on_gpu

SHIFT_PRESETS = ("auto", "all", "none")
CLEAN = "clean"
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
    """What ``pipeline.config.validate`` can check before any work: shift names, extra test entries."""
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


# --- predictions ----------------------------------------------------------------------------------
Variant = tuple[str, int]  # (shift, severity); (CLEAN, 0) is the untouched image


def shift_variants(shifts: Sequence[str], clean: bool = False) -> list[Variant]:
    return ([(CLEAN, 0)] if clean else []) + [(s, sev) for s in shifts for sev in SEVERITIES]


def _label(variant: Variant) -> str:
    return CLEAN if variant[0] == CLEAN else variant_name(*variant)


class _Copies(Dataset):
    """Each image decoded once, returned in every variant: ``(V, 3, H, W)``, target, index, readable."""

    def __init__(self, samples: list[tuple[str, int]], variants: list[Variant], transform, size: int, seed: int):
        self.samples, self.variants, self.transform, self.size, self.seed = samples, variants, transform, size, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = load_rgb(path, self.size)  # as the test loader decodes it
        except Exception:  # noqa: BLE001 - unreadable: left out of every variant's counts
            return torch.zeros(len(self.variants), 3, self.size, self.size), label, index, False
        copies = [
            self.transform(image if shift == CLEAN else apply_shift(image, shift, sev, self.seed, index))
            for shift, sev in self.variants
        ]
        return torch.stack(copies), label, index, True


@dataclass
class Predictions:
    """Every image's calibrated logits under every variant, in sample order."""

    variants: list[Variant]
    logits: torch.Tensor  # (V, N, outputs)
    targets: torch.Tensor  # (N,)
    readable: torch.Tensor  # (N,) bool
    images_per_second: float | None  # measured on the first batch

    def predicted(self, binary: bool) -> torch.Tensor:
        """(V, N) predicted class indices."""
        return torch.stack([to_probabilities(v, binary).argmax(1) for v in self.logits])


def eval_batch_size(device: torch.device | str, batch_size: int) -> int:
    """The evaluation's rule: small batches on CPU (see ``ImageFolderDataModule.eval_batch_size``)."""
    return min(CPU_EVAL_BATCH, batch_size) if torch.device(device).type == "cpu" else batch_size


def cost_line(n_images: int, copies: int, images_per_second: float, clean: bool = False) -> str:
    """``shift report: 16 shifted copies of 1000 test images, about 215 s at 74.4 img/s``."""
    total = n_images * (copies + int(clean))
    seconds = total / images_per_second if images_per_second > 0 else float("inf")
    plus = " (and the clean one)" if clean else ""
    return (
        f"shift report: {copies} shifted copies{plus} of {n_images} test images, "
        f"about {seconds:.0f} s at {images_per_second:.1f} img/s"
    )


@torch.inference_mode()
def predict_variants(
    model,
    samples: list[tuple[str, int]],
    variants: list[Variant],
    seed: int,
    device: torch.device | str,
    batch_size: int,
    num_workers: int,
    on_first_batch: Callable[[float], None] | None = None,
) -> Predictions:
    """Logits of ``model.logits`` (test-time flip and temperature included) for every sample under
    every variant. ``on_first_batch`` gets the images/s measured on the first batch."""
    device = torch.device(device)
    chunk = eval_batch_size(device, batch_size)
    size = int(model.hparams.image_size)
    transform = eval_transform(size, model.backbone.mean, model.backbone.std, model.backbone.interpolation)
    dataset = _Copies(samples, variants, transform, size, seed)
    per_batch = max(1, math.ceil(chunk / len(variants)))  # images per loader batch, ~ one model batch of copies
    loader = DataLoader(dataset, batch_size=per_batch, num_workers=num_workers, pin_memory=device.type == "cuda")
    outputs = 1 if model.binary else len(model.class_names)
    logits = torch.zeros(len(variants), len(samples), outputs)
    targets = torch.tensor([label for _, label in samples], dtype=torch.long)
    readable = torch.zeros(len(samples), dtype=torch.bool)
    was_training, home = model.training, next(model.parameters()).device
    model.eval().to(device)
    rate = None
    try:
        started = time.perf_counter()
        for images, _, indices, ok in loader:
            loaded = time.perf_counter()
            flat = images.flatten(0, 1).to(device, non_blocking=True)  # image-major: (B * V, 3, H, W)
            out = torch.cat([model.logits(flat[i : i + chunk]).float().cpu() for i in range(0, len(flat), chunk)])
            logits[:, indices] = out.view(len(indices), len(variants), outputs).transpose(0, 1)
            readable[indices] = ok
            if rate is None:
                # loading runs in the workers alongside the model: the slower of the two sets the pace
                wait, compute = loaded - started, time.perf_counter() - loaded
                pace = max(wait / num_workers, compute) if num_workers > 0 else wait + compute
                rate = len(flat) / max(pace, 1e-9)
                if on_first_batch is not None:
                    on_first_batch(rate)
    finally:
        model.train(was_training)
        model.to(home)
    return Predictions(variants, logits, targets, readable, rate)


def split_metrics(logits: torch.Tensor, targets: torch.Tensor, binary: bool) -> dict[str, Any]:
    """count, correct, accuracy with its 95% Wilson interval, ECE (the logits are calibrated already)."""
    count = len(targets)
    if count == 0:
        return {"count": 0, "correct": 0, "acc": None, "acc_ci95": None, "ece": None}
    correct = int((to_probabilities(logits, binary).argmax(1) == targets).sum())
    return {
        "count": count,
        "correct": correct,
        "acc": correct / count,
        "acc_ci95": list(wilson_interval(correct, count)),
        "ece": ece(logits, targets, binary),
    }


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def summarise_shifts(
    pred: Predictions, binary: bool, clean_acc: float | None, seed: int, temperature: float
) -> dict[str, Any]:
    """The report's numbers (JSON-ready) from the per-image predictions."""
    keep = pred.readable
    clean: dict[str, Any] = {"source": "evaluation", "acc": clean_acc}
    measured = {v: split_metrics(pred.logits[k][keep], pred.targets[keep], binary) for k, v in enumerate(pred.variants)}
    if (CLEAN, 0) in measured:
        clean = {"source": "measured here", **measured.pop((CLEAN, 0))}
    base = clean["acc"]
    shifts: dict[str, Any] = {}
    for (shift, sev), metrics in measured.items():
        drop = base - metrics["acc"] if base is not None and metrics["acc"] is not None else None
        setting = SHIFTS[shift].describe(sev)
        row = {"shift": shift, "severity": sev, "setting": setting, **metrics, "drop": drop}
        shifts[variant_name(shift, sev)] = row
    shift_acc = _mean([m["acc"] for m in shifts.values()])
    return {
        "seed": seed,
        "temperature": temperature,
        "images": int(keep.sum()),
        "unreadable": int((~keep).sum()),
        "clean": clean,
        "shifts": shifts,
        "shift_acc": shift_acc,
        "shift_ece": _mean([m["ece"] for m in shifts.values()]),
        "mean_drop": base - shift_acc if base is not None and shift_acc is not None else None,
        "images_per_second": pred.images_per_second,
    }


# --- outputs --------------------------------------------------------------------------------------
def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(interval: list[float] | None) -> str:
    return "n/a" if interval is None else f"{interval[0]:.4f}-{interval[1]:.4f}"


def _rows_table(first: str, rows: list[tuple[str, str, str, dict[str, Any]]]) -> list[str]:
    head = f"| {first} | severity | setting | accuracy | 95% interval | ECE | drop | correct / count |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, sev, setting, m in rows:
        numbers = [_num(m.get("acc")), _ci(m.get("acc_ci95")), _num(m.get("ece")), _num(m.get("drop"))]
        cells = [name, sev, setting, *numbers]
        cells.append(f"{m['correct']} / {m['count']}" if "count" in m else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def shift_table(report: dict[str, Any]) -> str:
    """``shift.md``: one row per shift and severity, the clean accuracy and the means."""
    clean = report["clean"]
    rows = [(CLEAN, "", f"({clean['source']})", clean)]
    rows += [(m["shift"], str(m["severity"]), m["setting"], m) for m in report["shifts"].values()]
    mean = {"acc": report["shift_acc"], "ece": report["shift_ece"], "drop": report["mean_drop"]}
    rows.append(("**mean (shift accuracy)**", "", "", mean))
    intro = (
        f"# Shift report\n\nTest split, {report['images']} images ({report['unreadable']} unreadable left out), "
        f"each shift applied to the decoded image before the evaluation transform; shift seed {report['seed']}, "
        f"temperature {report['temperature']:.3g}. Drop: clean accuracy minus the shifted one.\n"
    )
    return intro + "\n" + "\n".join(_rows_table("shift", rows)) + "\n"


def shift_chart(report: dict[str, Any]) -> Image.Image:
    """Horizontal bars of the accuracy under each shift with its 95% interval; the clean accuracy is
    the red line. Drawn with PIL, as the project's other figures."""
    font = _font()
    rows = list(report["shifts"].items())
    left, right, top, row_h = 250, 30, 40, 20
    width, height = 720, top + row_h * len(rows) + 40
    plot_w = width - left - right
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    title = f"test accuracy under input shifts (shift accuracy {_num(report['shift_acc'], 3)})"
    draw.text((10, 8), title, fill=(0, 0, 0), font=font)

    def x(value: float) -> float:
        return left + max(0.0, min(1.0, value)) * plot_w

    bottom = top + row_h * len(rows)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.line([x(tick), top - 4, x(tick), bottom], fill=(225, 225, 225))
        draw.text((x(tick) - 10, bottom + 4), f"{tick:.2f}", fill=(0, 0, 0), font=font)
    for i, (name, m) in enumerate(rows):
        y = top + i * row_h
        draw.text((6, y + 3), f"{name}: {m['setting']}"[:40], fill=(0, 0, 0), font=font)
        if m["acc"] is None:
            continue
        draw.rectangle([left, y + 3, x(m["acc"]), y + row_h - 3], fill=(90, 120, 220))
        low, high = m["acc_ci95"]
        mid = y + row_h // 2
        draw.line([x(low), mid, x(high), mid], fill=(0, 0, 0), width=1)
        for end in (low, high):
            draw.line([x(end), mid - 3, x(end), mid + 3], fill=(0, 0, 0), width=1)
    clean = report["clean"]["acc"]
    if clean is not None:
        draw.line([x(clean), top - 6, x(clean), bottom], fill=(220, 60, 60), width=2)
        label = f"clean {clean:.3f}"
        at = x(clean) + 3 if x(clean) < width - 90 else x(clean) - draw.textlength(label, font=font) - 3
        draw.text((at, top - 18), label, fill=(220, 60, 60), font=font)
    return canvas


def log_shift_report(writer, report: dict[str, Any], step: int = 0) -> None:
    """TensorBoard (a ``SummaryWriter`` or None): ``shift/<shift>-<severity>`` accuracies, the means
    and the chart."""
    if writer is None:
        return
    for name, m in report["shifts"].items():
        if m["acc"] is not None:
            writer.add_scalar(f"shift/{name}", m["acc"], step)
    for key in ("shift_acc", "shift_ece", "mean_drop"):
        if report[key] is not None:
            writer.add_scalar(f"shift/{key}", report[key], step)
    chart = torch.from_numpy(np.array(shift_chart(report))).permute(2, 0, 1)
    writer.add_image("shift/chart", chart, step)


def _save_png(path: Path, image: Image.Image) -> None:
    with atomic_target(path) as tmp:
        image.save(tmp, format="PNG")


def _predictions_csv(rows: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


def _shift_rows(samples, class_names, pred: Predictions, binary: bool) -> list[list[str]]:
    predicted = pred.predicted(binary)
    rows = [["file", "target", *[_label(v) for v in pred.variants]]]
    for i, (path, label) in enumerate(samples):
        cells = [class_names[int(p)] for p in predicted[:, i]] if pred.readable[i] else [""] * len(pred.variants)
        rows.append([path, class_names[label], *cells])
    return rows


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
    the files in ``run_dir``, logs to ``writer`` and returns the dict for ``metrics.json["shift"]``.
    ``clean_acc`` None: the clean copy is evaluated here too. ``announce`` gets the cost line,
    estimated on the first batch."""
    if not shifts:
        raise ValueError("run_shift_report needs at least one shift")
    resolve_shifts(list(shifts), on_gpu=True)
    run_dir = Path(run_dir)
    clean = clean_acc is None
    variants = shift_variants(shifts, clean=clean)
    copies = len(variants) - int(clean)

    def first_batch(rate: float) -> None:
        if announce is not None:
            announce(cost_line(len(samples), copies, rate, clean))

    pred = predict_variants(model, samples, variants, seed, device, batch_size, num_workers, first_batch)
    report = summarise_shifts(pred, model.binary, clean_acc, seed, float(model.temperature))
    report["files"] = dict(SHIFT_FILES)
    report = _json_clean(report)
    write_text_atomic(run_dir / SHIFT_FILES["json"], json_text(report))
    write_text_atomic(run_dir / SHIFT_FILES["table"], shift_table(report))
    _save_png(run_dir / SHIFT_FILES["chart"], shift_chart(report))
    rows = _shift_rows(samples, class_names, pred, model.binary)
    write_text_atomic(run_dir / SHIFT_FILES["predictions"], _predictions_csv(rows))
    log_shift_report(writer, report)
    return report


# --- extra test folders ---------------------------------------------------------------------------
def extra_tests_table(report: dict[str, Any]) -> str:
    rows = [(name, "", m["path"], m) for name, m in report["tests"].items()]
    intro = "# Extra test folders\n\nEach folder evaluated clean, as the test split."
    intro += " Drop: test accuracy minus the folder's.\n"
    return intro + "\n" + "\n".join(_rows_table("folder", rows)) + "\n"


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
    run_dir = Path(run_dir)
    tests: dict[str, Any] = {}
    rows = [["test", "file", "target", "predicted"]]
    for name, path in parse_extra_tests(extra_tests).items():
        samples = extra_test_samples(name, path, class_names)
        pred = predict_variants(model, samples, [(CLEAN, 0)], 0, device, batch_size, num_workers)
        keep = pred.readable
        metrics = split_metrics(pred.logits[0][keep], pred.targets[keep], model.binary)
        drop = clean_acc - metrics["acc"] if clean_acc is not None and metrics["acc"] is not None else None
        tests[name] = {"path": str(path), **metrics, "drop": drop, "unreadable": int((~keep).sum())}
        rows += [[name, *row] for row in _shift_rows(samples, class_names, pred, model.binary)[1:]]
    report = _json_clean({"test_acc": clean_acc, "tests": tests, "files": dict(EXTRA_FILES)})
    write_text_atomic(run_dir / EXTRA_FILES["json"], json_text(report))
    write_text_atomic(run_dir / EXTRA_FILES["table"], extra_tests_table(report))
    write_text_atomic(run_dir / EXTRA_FILES["predictions"], _predictions_csv(rows))
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
