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
    [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)],
)
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
