"""Kill -9 anywhere: a two-phase toy fine-tune killed at ten points, each resumed with
``ckpt_path=last``, ends with the uninterrupted run's weights and metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import finetune_args
from helpers import checkpoint_state, run_group
from toy_data import make_image_tree

KILL_AT = Path(__file__).resolve().parent / "kill_at.py"
# 6 steps per epoch; epoch 0 trains the head, epochs 1-2 the top block too. Checkpoint files in
# order: epoch 0's best and last (1, 2), the phase hand-over (3), then each epoch's best (where it is
# better: the toy model is at 100% from epoch 0, so where its validation loss fell) and last (4, 5: epoch 1)
POINTS = [
    "step:2",  # inside the head phase
    "val:0",  # during the first validation
    "writing:2",  # half-way through a checkpoint write
    "saved:3",  # between the phases (the hand-over is on disk, the next phase not started)
    "step:9",  # inside the second phase
    "writing:5",  # a checkpoint write in the second phase
    "val:2",  # during the last epoch's validation
    "test",  # during the final evaluation
    "temperature",  # while the temperature is being stored
    "metrics",  # before metrics.json
]
FAST = ("saved:3",)  # in the default suite (the phase hand-over); the rest with -m slow
# what legitimately differs between two runs of the same configuration
VOLATILE = {"wall_time_s", "run_dir", "best_ckpt", "test_predictions", "train_epoch_seconds", "train_images_per_s"}
VOLATILE |= {"peak_rss_mb", "peak_cuda_mb"}


def _launch(point: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRANSFER_RUN_DIR"}
    return subprocess.run(
        [sys.executable, str(KILL_AT), point, "0", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _outcome(out: Path, root: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    (folder,) = [p for p in run_group(out, "finetune", root).iterdir() if p.is_dir()]
    metrics = json.loads((folder / "metrics.json").read_text())
    stable = {k: v for k, v in metrics.items() if k not in VOLATILE}
    stable["calibration"] = {k: v for k, v in (stable.get("calibration") or {}).items() if k != "stored_in"}
    last = checkpoint_state(folder / "checkpoints" / "last.ckpt")
    return stable, checkpoint_state(Path(metrics["best_ckpt"])), last


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("kill")
    root = make_image_tree(base / "toy")
    args = lambda out: finetune_args(root, out)  # noqa: E731
    done = _launch("none", args(base / "whole"), base)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "args": args, "outcome": _outcome(base / "whole", root)}


@pytest.mark.parametrize("point", [p if p in FAST else pytest.param(p, marks=pytest.mark.slow) for p in POINTS])
def test_killed_anywhere_resumes_to_the_same_result(reference, tmp_path, point):
    args = reference["args"](tmp_path / "out")
    killed = _launch(point, args, tmp_path)
    assert killed.returncode == -signal.SIGKILL, (point, killed.returncode, killed.stderr[-3000:])
    resumed = _launch("none", [*args, "ckpt_path=last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics, best, last = _outcome(tmp_path / "out", reference["root"])
    want_metrics, want_best, want_last = reference["outcome"]
    assert metrics == want_metrics
    for got, want in ((best, want_best), (last, want_last)):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), point
