"""The shift report's inference: every test image decoded once and evaluated in several copies
(each shift of ``datamodules.shifts`` at each severity, and the clean image when asked), then the
accuracy with its 95% Wilson interval and the ECE of each copy."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from core.progress import Progress
from datamodules.image_folder import CPU_EVAL_BATCH
from datamodules.image_io import load_rgb, unreadable_reason
from datamodules.shifts import SEVERITIES, SHIFTS, apply_shift, variant_name
from datamodules.transforms import backbone_eval_transform
from datamodules.workers import worker_options
from lightning_modules.calibration import ece, to_probabilities
from pipeline.studies.statistics import wilson_interval

CLEAN = "clean"
Variant = tuple[str, int]  # (shift, severity); (CLEAN, 0) is the untouched image


def shift_variants(shifts: Sequence[str], clean: bool = False) -> list[Variant]:
    return ([(CLEAN, 0)] if clean else []) + [(s, sev) for s in shifts for sev in SEVERITIES]


def variant_label(variant: Variant) -> str:
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
        except Exception as err:  # noqa: BLE001 - unreadable: left out of every variant's counts
            return torch.zeros(len(self.variants), 3, self.size, self.size), label, index, unreadable_reason(err)
        copies = [
            self.transform(image if shift == CLEAN else apply_shift(image, shift, sev, self.seed, index))
            for shift, sev in self.variants
        ]
        return torch.stack(copies), label, index, ""


@dataclass
class Predictions:
    """Every image's calibrated logits under every variant, in sample order."""

    variants: list[Variant]
    logits: torch.Tensor  # (V, N, outputs)
    targets: torch.Tensor  # (N,)
    readable: torch.Tensor  # (N,) bool
    images_per_second: float | None  # measured on the first batch
    errors: list[str]  # why each unreadable image could not be read ("" for the others)

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
    progress: str | None = None,
) -> Predictions:
    """Logits of ``model.logits`` (test-time flip and temperature included) for every sample under
    every variant: the project's one inference loop outside Lightning (shift report, extra test
    folders, ``predict.py``), with the evaluation's CPU batch rule. ``on_first_batch`` gets the
    images/s measured on the first batch; ``progress``: the name of the loop in its progress
    lines (``core.progress``: images/s and time left), none without it."""
    device = torch.device(device)
    chunk = eval_batch_size(device, batch_size)
    size = int(model.hparams.image_size)
    transform = backbone_eval_transform(model.backbone, size)
    dataset = _Copies(samples, variants, transform, size, seed)
    per_batch = max(1, math.ceil(chunk / len(variants)))  # images per loader batch, ~ one model batch of copies
    loader = DataLoader(
        dataset,
        batch_size=per_batch,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        **worker_options(num_workers),
    )
    outputs = 1 if model.binary else len(model.class_names)
    logits = torch.zeros(len(variants), len(samples), outputs)
    targets = torch.tensor([label for _, label in samples], dtype=torch.long)
    readable = torch.zeros(len(samples), dtype=torch.bool)
    errors = [""] * len(samples)
    was_training, home = model.training, next(model.parameters()).device
    model.eval().to(device)
    rate = None
    bar = Progress(len(samples) * len(variants), progress or "", enabled=progress is not None)
    try:
        started = time.perf_counter()
        for images, _, indices, reasons in loader:
            loaded = time.perf_counter()
            flat = images.flatten(0, 1).to(device, non_blocking=True)  # image-major: (B * V, 3, H, W)
            out = torch.cat([model.logits(flat[i : i + chunk]).float().cpu() for i in range(0, len(flat), chunk)])
            logits[:, indices] = out.view(len(indices), len(variants), outputs).transpose(0, 1)
            readable[indices] = torch.tensor([not r for r in reasons])
            for i, reason in zip(indices.tolist(), reasons):
                errors[i] = reason
            bar.update(len(flat))
            if rate is None:
                # loading runs in the workers alongside the model: the slower of the two sets the pace
                wait, compute = loaded - started, time.perf_counter() - loaded
                pace = max(wait / num_workers, compute) if num_workers > 0 else wait + compute
                rate = len(flat) / max(pace, 1e-9)
                if on_first_batch is not None:
                    on_first_batch(rate)
    finally:
        bar.close()
        model.train(was_training)
        model.to(home)
    return Predictions(variants, logits, targets, readable, rate, errors)


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
