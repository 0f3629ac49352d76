"""DataLoader workers that leave the stop signals to the main process.

SLURM (scancel, a time limit, preemption), systemd and a terminal's Ctrl+C signal the whole process
group, workers included. A worker that dies of the signal ends the run in PyTorch's "DataLoader worker
exited unexpectedly" before the main process, which handles the signal (``run_safety``: the step
finishes, ``last.ckpt`` is written, exit 143 or 130), reaches the next step boundary and stops its
workers itself. So the workers ignore SIGTERM and SIGINT.

A worker must still stop when its own main process ends it: PyTorch's shutdown (as a fallback) and
Python's exit routine call ``Process.terminate()``, which sends SIGTERM, and a process that crashed
with its workers alive would otherwise wait for them forever. A signal handler cannot tell who sent the
signal, and blocking it for ``sigwaitinfo`` misses the native threads a worker already runs, so the
workers are started from a context whose ``terminate()`` sends SIGKILL. A worker whose main process is
gone exits on its own (PyTorch's watchdog).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from multiprocessing import context as mp_context
from typing import Any

from lightning.fabric.utilities.seed import pl_worker_init_function


class WorkerInit:
    """A ``worker_init_fn``. Setting one stops Lightning from adding its own seeding function
    (``seed_everything(workers=True)``), so with ``lightning_seeding`` it calls that function
    itself, with the rank Lightning would give it."""

    def __init__(self, lightning_seeding: bool = False, rank: int | None = None):
        self.lightning_seeding = lightning_seeding
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.lightning_seeding and int(os.environ.get("PL_SEED_WORKERS", 0)):
            pl_worker_init_function(worker_id, rank=self.rank)


def worker_options(num_workers: int, lightning_seeding: bool = False, rank: int | None = None) -> dict[str, Any]:
    """The DataLoader arguments for the project's workers (none without workers: PyTorch refuses a
    context for in-process loading)."""
    if num_workers == 0:
        return {}
    context = _CONTEXTS[multiprocessing.get_start_method()]()  # the platform's default start method
    return {"worker_init_fn": WorkerInit(lightning_seeding, rank), "multiprocessing_context": context}


class _SpawnProcess(mp_context.SpawnProcess):
    def terminate(self) -> None:
        self.kill()


class _SpawnContext(mp_context.SpawnContext):
    Process = _SpawnProcess


_CONTEXTS: dict[str, type[mp_context.BaseContext]] = {"spawn": _SpawnContext}

if hasattr(mp_context, "ForkProcess"):  # POSIX

    class _ForkProcess(mp_context.ForkProcess):
        def terminate(self) -> None:
            self.kill()

    class _ForkContext(mp_context.ForkContext):
        Process = _ForkProcess

    class _ForkServerProcess(mp_context.ForkServerProcess):
        def terminate(self) -> None:
            self.kill()

    class _ForkServerContext(mp_context.ForkServerContext):
        Process = _ForkServerProcess

    _CONTEXTS |= {"fork": _ForkContext, "forkserver": _ForkServerContext}
