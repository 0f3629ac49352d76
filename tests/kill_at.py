"""Run ``train.py`` in this process and SIGKILL it at a named point (the kill tests' launcher).

``python tests/kill_at.py POINT START_AT [key=value ...]``: waits until the wall-clock time
``START_AT`` (0: at once) or, where ``START_AT`` is a path, writes ``START_AT.<pid>.ready`` once
its imports are done and waits until the file ``START_AT`` exists (so several launches start at
one instant), then runs train.main and kills itself, without any clean-up, when it reaches ``POINT``:

- ``none``: never (the uninterrupted run);
- ``step:N``: before training step N;
- ``wait:N``: not a kill: before training step N it writes the file named by ``$KILL_AT_MARKER``
  and waits (at most 300 s) for a signal from outside, SIGTERM (the step then runs, and the run
  stops at its end) or SIGKILL, so the signal lands at step N on any machine;
- ``val:E``: at the start of epoch E's validation;
- ``saved:N``: right after the N-th checkpoint file is complete (``saved:2`` of a two-phase run with
  one epoch of warm-up is the phase hand-over);
- ``writing:N``: half-way through writing the N-th checkpoint (its temporary file left behind);
- ``test``: inside the final evaluation's test pass;
- ``temperature``: as the fitted temperature is about to be stored in the best checkpoint;
- ``metrics``: just before ``metrics.json`` is written.

- ``scan``: as the data is about to be scanned;
- ``cache``: as the decoded-image cache is about to be built (``data.decoded_cache=true``);
- ``tensorboard:N``: before TensorBoard's N-th flush of its event file.

The points are hooks, not timers, so each kill lands where it is named on any machine.

With ``$KILL_AT_PAUSE`` set (the fault-injection tests), the process is not killed: at the point
it writes its pid to the file ``$KILL_AT_PAUSE`` and waits (at most 300 s) until
``$KILL_AT_PAUSE.go`` exists, then carries on (``writing:N`` pauses before the N-th checkpoint
write). The tests switch faults on from outside meanwhile. With ``$KILL_AT_UNTIL=M`` as well, it
pauses again before training step M (``$KILL_AT_PAUSE.until``, released by ``.until.go``), so that
the faults cover exactly the steps in between.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


PAUSE = os.environ.get("KILL_AT_PAUSE")
_paused: list[str] = []


def _die() -> None:
    if PAUSE:
        _pause()
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def _pause(name: str = "") -> None:
    """Once per name and process: say where we are, then wait to be released (module docstring)."""
    if name in _paused:
        return
    _paused.append(name)
    Path(f"{PAUSE}{name}").write_text(str(os.getpid()))
    go, deadline = Path(f"{PAUSE}{name}.go"), time.time() + 300
    while not go.exists() and time.time() < deadline:
        time.sleep(0.01)


def _pause_until(step: int) -> None:
    """The second pause of ``$KILL_AT_UNTIL`` (see the module docstring); also at the next validation
    after the first pause, should the step never come (a batch whose images all failed trains no step)."""
    from lightning_modules.run_safety import EpochTimer, StepSeed

    original = StepSeed.on_train_batch_start
    original_val = EpochTimer.on_validation_start

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step >= step and "" in _paused:
            _pause(".until")
        return original(self, trainer, *args)

    def on_validation_start(self, trainer, pl_module):
        if "" in _paused:
            _pause(".until")
        return original_val(self, trainer, pl_module)

    StepSeed.on_train_batch_start = on_train_batch_start
    EpochTimer.on_validation_start = on_validation_start


def install(point: str) -> None:
    import torch

    if PAUSE and os.environ.get("KILL_AT_UNTIL"):
        _pause_until(int(os.environ["KILL_AT_UNTIL"]))

    import core.atomic_io as atomic_io
    from lightning_modules.classifier import TransferClassifier
    from lightning_modules.run_safety import EpochTimer, StepSeed

    name, _, arg = point.partition(":")
    n = int(arg) if arg else 0
    if name == "step":
        original = StepSeed.on_train_batch_start

        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == n:
                _die()
            return original(self, trainer, *args)

        StepSeed.on_train_batch_start = on_train_batch_start
    elif name == "wait":
        original_wait = StepSeed.on_train_batch_start

        def on_train_batch_start_waiting(self, trainer, *args):
            if trainer.global_step == n:
                Path(os.environ["KILL_AT_MARKER"]).write_text(str(os.getpid()))
                deadline = time.time() + 300
                while not trainer.received_sigterm and time.time() < deadline:
                    time.sleep(0.01)  # Lightning's SIGTERM handler sets the flag; SIGKILL ends here
            return original_wait(self, trainer, *args)

        StepSeed.on_train_batch_start = on_train_batch_start_waiting
    elif name == "val":
        original_val = EpochTimer.on_validation_start

        def on_validation_start(self, trainer, pl_module):
            if trainer.state.fn == "fit" and not trainer.sanity_checking and trainer.current_epoch == n:
                _die()
            return original_val(self, trainer, pl_module)

        EpochTimer.on_validation_start = on_validation_start
    elif name in ("saved", "writing"):
        count = {"saves": 0}
        original_save = atomic_io.torch_save_atomic

        def torch_save_atomic(obj, path):
            count["saves"] += 1
            if PAUSE and name == "writing" and count["saves"] == n:
                _pause()
            elif name == "writing" and count["saves"] == n:
                with atomic_io.atomic_target(path) as tmp:
                    torch.save(obj, tmp)
                    with open(tmp, "r+b") as f:
                        f.truncate(os.path.getsize(tmp) // 2)
                    _die()
            original_save(obj, path)
            if name == "saved" and count["saves"] == n:
                _die()

        atomic_io.torch_save_atomic = torch_save_atomic
        import lightning_modules.run_safety as run_safety

        run_safety.torch_save_atomic = torch_save_atomic
    elif name == "test":
        original_test = TransferClassifier.on_test_start

        def on_test_start(self):
            _die()
            original_test(self)

        TransferClassifier.on_test_start = on_test_start
    elif name == "temperature":
        import pipeline.runner.evaluation as evaluation

        original_store = evaluation.store_temperature

        def store_temperature(path, temperature):
            _die()
            return original_store(path, temperature)

        evaluation.store_temperature = store_temperature
    elif name == "metrics":
        from pipeline.runner.run_dir import RunFolder

        original_json = RunFolder.write_json

        def write_json(folder, name, data):
            if name == "metrics.json":
                _die()
            return original_json(folder, name, data)

        RunFolder.write_json = write_json
    elif name == "scan":
        import pipeline.runner.build as build

        original_scan = build.scan_data

        def scan_data(cfg):
            _die()
            return original_scan(cfg)

        build.scan_data = scan_data
    elif name == "cache":
        import datamodules.decoded_cache as decoded

        original_build = decoded._build

        def _build(*args, **kwargs):
            _die()
            return original_build(*args, **kwargs)

        decoded._build = _build
    elif name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        original_flush = TensorBoardLogger.save
        flushes = {"n": 0}

        def save(self):
            flushes["n"] += 1
            if flushes["n"] == n:
                _die()
            return original_flush(self)

        TensorBoardLogger.save = save
    elif name != "none":
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    point, start_at, *train_args = sys.argv[1:]
    install(point)
    import train

    try:
        at = float(start_at)
    except ValueError:
        go = Path(start_at)
        Path(f"{go}.{os.getpid()}.ready").touch()
        while not go.exists():
            time.sleep(0.005)
    else:
        while time.time() < at:
            time.sleep(0.005)
    train.main(train_args)
