"""A signal to the whole process group (SLURM's scancel and time limit, systemd, a terminal's Ctrl+C)
reaches the DataLoader workers too. Before, a worker died of it and the run ended in PyTorch's
"DataLoader worker exited unexpectedly" traceback, with no checkpoint of the step it stopped at."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import fast_args
from toy_data import make_image_tree

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("sig", "code"),
    [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
)
@pytest.mark.slow  # a real run in a subprocess (7 s); the default suite keeps the unit test below
def test_a_signal_to_the_process_group_with_workers_saves_and_ends_in_one_line(tmp_path, sig, code):
    root = make_image_tree(tmp_path / "data", size=32, per_class={"train": 100, "validation": 16, "test": 8})
    args = [a for a in fast_args(root, tmp_path / "out", stage="finetune") if not a.startswith("data.num_workers")]
    args += ["data.num_workers=2", "trainer.max_epochs=50"]
    run = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a job step's or a terminal's
    )
    try:
        lines = []
        for line in run.stdout:  # training with workers has begun: the first epoch is done
            lines.append(line)
            if line.startswith("epoch 1/"):
                break
        os.killpg(run.pid, sig)
        lines.append(run.stdout.read())
        run.wait(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    output = "".join(lines)
    assert run.returncode == code, output[-3000:]
    assert "Traceback" not in output and "exited unexpectedly" not in output, output[-3000:]
    name = signal.Signals(sig).name
    stopped = re.search(rf"{name}: stopped at epoch (\d+), step (\d+); state saved to (\S+);", output)
    assert stopped, output[-3000:]
    saved = torch.load(stopped.group(3), map_location="cpu", weights_only=False)
    assert saved["global_step"] == int(stopped.group(2)) > 0


def test_a_worker_ignores_sigterm_and_its_main_process_still_stops_it():
    from torch.utils.data import DataLoader

    from datamodules.workers import worker_options

    loader = DataLoader(list(range(64)), batch_size=4, num_workers=1, **worker_options(1))
    batches = iter(loader)
    first = next(batches)
    (worker,) = batches._workers
    os.kill(worker.pid, signal.SIGTERM)  # as a process group's signal reaches it
    assert [int(b[0]) for b in batches] == list(range(4, 64, 4)) and int(first[0]) == 0
    assert worker.exitcode is not None  # stopped by the loader at the end
    # what PyTorch's shutdown (as a fallback) and Python's exit routine do to a worker: terminate()
    context = worker_options(1)["multiprocessing_context"]
    ready = context.Event()
    process = context.Process(target=_ignore_sigterm_until_killed, args=(ready,), daemon=True)
    process.start()
    try:
        assert ready.wait(timeout=30)
        process.terminate()
        process.join(timeout=30)
        assert process.exitcode == -signal.SIGKILL  # SIGTERM is ignored: terminate() sends SIGKILL
    finally:
        if process.is_alive():
            process.kill()


def _ignore_sigterm_until_killed(ready) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    while True:
        signal.pause()


@pytest.mark.slow  # a fresh interpreter importing torch (5 s)
def test_a_crash_inside_a_loader_loop_still_exits(tmp_path):
    """A bug raised while a loader's workers are alive: the traceback, then exit 1. Python's exit
    routine ends the workers with ``terminate()`` and waits for them: were it SIGTERM, which the
    workers ignore, the process would wait forever."""
    script = tmp_path / "crash.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from torch.utils.data import DataLoader\n"
        "from datamodules.workers import worker_options\n"
        "loader = DataLoader(list(range(100)), batch_size=2, num_workers=1, **worker_options(1))\n"
        "for batch in loader:\n"
        "    raise RuntimeError('a bug')\n"
    )
    crash = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = crash.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(crash.pid, signal.SIGKILL)
        crash.communicate()
        pytest.fail("the crashed process did not exit in 60 s: its workers outlived it")
    assert crash.returncode == 1 and "RuntimeError: a bug" in stderr
