"""What every DataLoader worker of the project does first: leave SIGTERM and SIGINT to the main process.

SLURM (scancel, a time limit, preemption), systemd and a terminal's Ctrl+C signal the whole process
group, workers included. A worker that dies of the signal ends the run in PyTorch's "DataLoader worker
exited unexpectedly" before the main process, which handles the signal (``run_safety``: the step
finishes, ``last.ckpt`` is written, exit 143 or 130), reaches the next step boundary. The main process
stops its workers itself; a worker whose main process is gone exits on its own (PyTorch's watchdog).
"""

from __future__ import annotations

import os
import signal

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
