"""One record per training epoch: a line on the console when there is no progress bar (a run whose
output goes to a file), and a row of the run folder's ``metrics.csv``."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from core.progress import Progress, duration
from lightning_modules.run_safety import EpochTimer
from lightning_modules.schedule import Plan
from lightning_modules.tensorboard_views import tensorboard_writer

METRICS_CSV = "metrics.csv"
# TensorBoard's scalar behind each column of metrics.csv (the learning rates: lr/<group>, per step)
COLUMNS = {"train_loss": "train/loss_epoch", "train_acc": "train/acc", "val_loss": "val/loss", "val_acc": "val/acc"}
# the same numbers against the epoch (Lightning logs them against the step): the seed's per-epoch plots
EPOCH_TAG = "epoch/{}"


class Folder(Protocol):
    """Where ``metrics.csv`` goes: ``pipeline.runner.run_dir.RunFolder`` (atomic, rank zero)."""

    def __truediv__(self, name: str) -> Path: ...

    def write_text(self, name: str, text: str) -> Path: ...


def say(line: str) -> None:
    print(line, flush=True)  # flushed: a redirected stdout is block-buffered, stderr is not


def _value(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a ``metrics.csv`` (none if it does not exist)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def csv_text(rows: list[dict[str, Any]]) -> str:
    """``rows`` as CSV, with the union of their columns in order of appearance (empty where missing)."""
    header: dict[str, None] = {}
    for row in rows:
        header |= dict.fromkeys(row)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(header), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return out.getvalue()


class EpochLog(Callback):
    """At the end of each training epoch (after its validation): epoch, phase, the learning rate of
    every plan group (at the epoch's last step), train loss and accuracy, validation loss and
    accuracy, training images/s. Logged to TensorBoard against the epoch (``epoch/<column>``);
    printed as one line when the trainer shows no progress bar; written to the run folder's
    ``metrics.csv`` (global rank zero, atomically), keeping the rows of earlier epochs (earlier
    phases and resumed runs included) and replacing those a killed run wrote after its checkpoint.

    One instance serves every phase of a stage: ``plan`` (set again after an early stop) gives the
    phase and the epochs left, ``timer`` the images/s, ``print_line`` where the line goes."""

    def __init__(self, plan: Plan, timer: EpochTimer, folder: Folder | None, print_line: Callable[[str], None] = say):
        self.plan, self.timer, self.folder, self.print_line = plan, timer, folder, print_line
        self.started = time.perf_counter()
        self.epochs_here = 0  # epochs this process trained: the pace for the time left

    def row(self, trainer: Trainer) -> dict[str, Any]:
        epoch = trainer.current_epoch
        metrics = trainer.callback_metrics
        rates = {}
        for group in trainer.optimizers[0].param_groups if trainer.optimizers else []:
            rates.setdefault(f"lr/{group.get('name', len(rates))}", float(group["lr"]))
        timed = self.timer.epochs[-1] if self.timer.epochs and self.timer.epochs[-1]["epoch"] == epoch else None
        speed = timed["images"] / timed["seconds"] if timed and timed["seconds"] > 0 else None
        return {
            "epoch": epoch,
            "phase": self.plan.phase_index(epoch),
            **{f"lr/{name}": rates.get(f"lr/{name}") for name, _ in self.plan.groups},
            **{column: _value(metrics, key) for column, key in COLUMNS.items()},
            "images_per_s": round(speed, 2) if speed is not None else None,
        }

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        row = self.row(trainer)
        self.epochs_here += 1
        writer = tensorboard_writer(trainer)
        if writer is not None:
            for column in COLUMNS:
                if row[column] is not None:
                    writer.add_scalar(EPOCH_TAG.format(column), row[column], row["epoch"])
        if self.folder is not None:
            kept = [r for r in read_rows(self.folder / METRICS_CSV) if int(r["epoch"]) < row["epoch"]]
            self.folder.write_text(METRICS_CSV, csv_text([*kept, row]))
        if trainer.progress_bar_callback is None:
            self.print_line(self.line(row))

    def line(self, row: dict[str, Any]) -> str:
        elapsed = time.perf_counter() - self.started
        left = self.plan.epochs - row["epoch"] - 1
        parts = [f"epoch {row['epoch'] + 1}/{self.plan.epochs}", f"phase {row['phase']}"]
        for label, column, fmt in (
            ("train loss", "train_loss", ".4f"),
            ("val loss", "val_loss", ".4f"),
            ("val acc", "val_acc", ".2%"),
            ("images/s", "images_per_s", ".1f"),
        ):
            if row[column] is not None:
                parts.append(f"{label} {row[column]:{fmt}}")
        parts.append(f"elapsed {duration(elapsed)}")
        parts.append(f"remaining {duration(elapsed / self.epochs_here * left)}")
        return "  ".join(parts)


class EvaluationProgress(Callback):
    """Images/s and time left of a ``validate`` or ``test`` outside a fit (the best model's
    evaluation) when the trainer shows no progress bar: ``core.progress`` lines. The validation
    inside a fit needs none: its epoch's line follows."""

    def __init__(self) -> None:
        self.progress: Progress | None = None

    def _start(self, trainer: Trainer, loaders: Any, desc: str) -> None:
        if trainer.progress_bar_callback is not None or trainer.state.fn == TrainerFn.FITTING:
            return
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        total = sum(len(getattr(loader, "dataset", ())) for loader in loaders if loader is not None)
        self.progress = Progress(total, desc)

    def _update(self, trainer: Trainer, batch: Any) -> None:
        if self.progress is not None and batch is not None:
            self.progress.update(int(batch[1].shape[0]) * trainer.world_size)

    def _close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, trainer.val_dataloaders, "evaluation (val)")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, trainer.test_dataloaders, "evaluation (test)")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(trainer, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(trainer, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()
