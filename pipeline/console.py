"""What the command line shows: library notes that say nothing to the user are dropped, warnings are
one line each, and a run ends with its result and the commands to type next."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.errors import FULL_DISK, RunInterrupted, UserError, os_error_cause, os_error_line
from core.words import count

# Library messages that carry nothing a user of this project can act on, each with why:
QUIET_WARNINGS = (
    # torch's pytree deprecation inside Lightning's own code (lightning/pytorch/utilities/_pytree.py)
    r".*isinstance\(treespec, LeafSpec\).*",
    # torchmetrics on an evaluation batch of one class (AUROC/F1 are computed over the epoch anyway)
    r".*No positive samples in targets.*",
    r".*No negative samples in targets.*",
    # the toy and small-data case: the project logs every epoch's figures regardless
    r".*is smaller than the logging interval.*",
    # the project gives every loader its workers on purpose (data.num_workers)
    r".*does not have many workers.*",
)
QUIET_LOGS = (
    "💡 Tip:",  # Lightning's advertisement for its cloud logger
    "`weights_only` was not set",  # the project loads its own checkpoints (full trainer state, trusted)
)


RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _DropNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(note in message for note in QUIET_LOGS)


def _one_line(message, category, filename, lineno, file=None, line=None) -> str:
    # no source echo: the warning is the project's (or a library's) message, not a location
    return f"warning: {message}\n"


def say(line: str, attempts: int = 30) -> None:
    """Write ``line`` to stderr, retried for up to 3 s if the write fails: it is the line that says
    how a run ended, and a transient I/O fault (or a full pipe) must not swallow it."""
    try:
        print(line, file=sys.stderr, flush=True)
        return
    except (OSError, ValueError):
        pass
    data = (line.rstrip("\n") + "\n").encode("utf-8", errors="replace")
    for _ in range(attempts):
        try:
            while data:
                data = data[os.write(2, data) :]
            return
        except OSError:
            time.sleep(0.1)


def exit_on_known(err: BaseException, resume_hint: bool = True) -> None:
    """End the process with one line and an exit code if ``err`` is the user's or the machine's: a
    ``UserError`` (its own code: 2, 3, 128 + signal for an interrupted run), or an operating-system
    error, also one a library re-raised as its own type (2 for a full disk, 3 for any other). Returns
    for anything else (a bug: the caller re-raises it, with its traceback). ``resume_hint``: the
    command saves checkpoints, so its line says how to continue."""
    if isinstance(err, RunInterrupted):  # not an error: the state is saved and the same command continues
        say(str(err))
        raise SystemExit(err.exit_code) from None
    if isinstance(err, UserError):
        say(f"error: {err}")
        raise SystemExit(err.exit_code) from None
    cause = os_error_cause(err)
    if cause is None:
        return
    hint = "; the run folder keeps its last checkpoint: the same command with ckpt_path=last continues" * resume_hint
    say(f"error: {os_error_line(cause)}{hint}")
    raise SystemExit(2 if cause.errno in FULL_DISK else 3) from None


def _background_failure(args: threading.ExceptHookArgs) -> None:
    """A library's writer thread (TensorBoard's event writer) that fails on an I/O error hands the
    error to the main thread, which ends the run with one line (``exit_on_known``); printing the thread's
    traceback as well would bury that line."""
    if isinstance(args.exc_value, OSError):
        return
    _default_excepthook(args)


_default_excepthook = threading.excepthook


def quiet_console() -> None:
    """For the command line (train.py, predict.py), for the whole process; the Python API's runs use
    :func:`quieted`, for their own duration: a library importer keeps its own settings."""
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.formatwarning = _one_line
    threading.excepthook = _background_failure
    logging.raiseExceptions = False  # a log line that cannot be written (a failing stderr) is dropped, no traceback
    for name in ("lightning.pytorch", "lightning.fabric", RANK_ZERO_LOGGER):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotes) for f in logger.filters):
            logger.addFilter(_DropNotes())
    for handler in logging.getLogger("lightning.pytorch").handlers:
        if not any(isinstance(f, _DropNotes) for f in handler.filters):
            handler.addFilter(_DropNotes())


@contextlib.contextmanager
def quieted() -> Iterator[None]:
    """``quiet_console`` for the block only (the Python API's runs): a notebook sees what train.py
    prints, and keeps its own warning filters, formats and hooks afterwards."""
    saved = warnings.formatwarning, threading.excepthook, logging.raiseExceptions
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", RANK_ZERO_LOGGER)]
    targets = [*loggers, *logging.getLogger("lightning.pytorch").handlers]
    had_filter = [any(isinstance(f, _DropNotes) for f in t.filters) for t in targets]
    with warnings.catch_warnings():
        quiet_console()
        try:
            yield
        finally:
            warnings.formatwarning, threading.excepthook, logging.raiseExceptions = saved
            for target, had in zip(targets, had_filter):
                if not had:
                    for f in [f for f in target.filters if isinstance(f, _DropNotes)]:
                        target.removeFilter(f)


def _acc(split: dict[str, Any] | None) -> str:
    if not split or split.get("acc") is None:
        return "n/a"
    low, high = split.get("acc_ci95") or (None, None)
    interval = f" (95% interval {100 * low:.1f}-{100 * high:.1f}%)" if low is not None else ""
    return f"{100 * split['acc']:.1f}% of {split.get('count', '?')}{interval}"


def _chosen(metrics: dict[str, Any]) -> list[str]:
    """Which epoch's model the figures are from, and its phase; a note when a fine-tuning stage's
    choice is its head warm-up (no fine-tuned epoch beat it on validation)."""
    epoch = metrics.get("best_epoch")
    if epoch is None:
        return []
    phases = metrics.get("phases") or []
    phase = next((p for p in phases if p["epochs"][0] <= epoch < p["epochs"][1]), None)
    where, head_only = "", False
    if phase is not None and len(phases) > 1:
        head_only = not phase.get("blocks") and not phase.get("top_blocks")
        if phase.get("blocks"):
            trained = f"the head and blocks {phase['blocks']}"
        elif not head_only:
            trained = f"the head and the top {count(phase['top_blocks'], 'block')}"
        else:
            trained = "the head alone"
        where = f", phase {phase['phase']} ({trained})"
    lines = [f"  chosen model         epoch {epoch + 1} of {metrics.get('epochs', '?')}{where}, on validation"]
    if head_only:
        lines.append("  note: no fine-tuned epoch beat the head warm-up on validation; these figures are the warm-up's")
    return lines


def _epochs(epochs: int | None) -> str:
    return "epochs ?" if epochs is None else count(epochs, "epoch")


def seeds_command(stage: str, argv: list[str] | None) -> str:
    """``python train.py <this run's overrides> seeds=[1,2,3]``, quoted for a shell (without ``argv``,
    ``...`` stands for them)."""
    if argv is None:
        return f"python train.py stage={stage} ... seeds=[1,2,3]"
    kept = [a for a in argv if a.split("=", 1)[0] not in ("stage", "seed", "seeds", "ckpt_path")]
    return shlex.join(["python", "train.py", f"stage={stage}", *kept, "seeds=[1,2,3]"])


def result_block(metrics: dict[str, Any], argv: list[str] | None = None) -> str:
    """The end of a single run: its figures (the same numbers as metrics.json), its folder and what
    to type next (``argv``: the run's overrides, repeated in the command with three seeds)."""
    run_dir = Path(metrics["run_dir"])
    test = metrics.get("test") or {}
    calibration = metrics.get("calibration") or {}
    ckpt = metrics.get("best_ckpt") or metrics.get("ckpt_path") or str(run_dir / "checkpoints" / "last.ckpt")
    lines = [
        "",
        f"result: stage={metrics['stage']} model.backbone={metrics['backbone']}",
        f"  validation accuracy  {_acc(metrics.get('val'))}",
        f"  test accuracy        {_acc(test)}",
    ]
    if test.get("ece") is not None:
        temperature = calibration.get("temperature", 1.0)
        lines.append(f"  test ECE             {test['ece']:.4f} (temperature {temperature:.3g})")
    if (metrics.get("shift") or {}).get("shift_acc") is not None:
        lines.append(f"  shift accuracy       {100 * metrics['shift']['shift_acc']:.1f}% (mean of shift.md's rows)")
    lines += _chosen(metrics)
    lines += [
        f"  {_epochs(metrics.get('epochs'))}, wall time {metrics.get('wall_time_s', 0):.0f} s",
        f"  run folder           {run_dir}",
        "next:",
        f"  tensorboard --logdir {run_dir.parent.parent}",
        f"  python predict.py ckpt_path={ckpt} inputs=PATH/TO/photos output=predictions.csv",
    ]
    if metrics["stage"] != "test":
        lines.append(f"  {seeds_command(metrics['stage'], argv)}   (the same with three seeds)")
    return "\n".join(lines) + "\n"
