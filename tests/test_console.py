"""The command line's console: no library chatter, one-line warnings, a result block at the end
whose figures are metrics.json's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, fast_args
from helpers import run_group

LIBRARY_NOISE = ("LeafSpec", "_pytree", "No positive samples", "litlogger", "weights_only", "rank_zero_warn(")


def test_a_toy_run_is_quiet_and_ends_with_its_result(toy_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRANSFER_RUN_DIR"}
    args = fast_args(toy_root, tmp_path / "out", stage="frozen", **{"trainer.max_epochs": "1"})
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    for noise in LIBRARY_NOISE:
        assert noise not in console, noise
    assert "site-packages" not in proc.stderr  # no warning echoes a library's source line
    (metrics_file,) = run_group(tmp_path / "out", "frozen", toy_root).glob("*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    block = proc.stdout[proc.stdout.index("result: stage=frozen") :]
    for split, label in (("val", "validation accuracy"), ("test", "test accuracy")):
        m = re.search(label + r"\s+([\d.]+)% of (\d+) \(95% interval ([\d.]+)-([\d.]+)%\)", block)
        assert m, block
        acc, count, low, high = float(m[1]), int(m[2]), float(m[3]), float(m[4])
        assert acc == round(100 * metrics[split]["acc"], 1) and count == metrics[split]["count"]
        assert (low, high) == tuple(round(100 * x, 1) for x in metrics[split]["acc_ci95"])
    assert f"{metrics['test']['ece']:.4f}" in block
    assert str(metrics_file.parent) in block and f"tensorboard --logdir {metrics_file.parent.parent.parent}" in block
    assert f"python predict.py ckpt_path={metrics['best_ckpt']}" in block and "seeds=[1,2,3]" in block
    assert Path(metrics["run_dir"]) == metrics_file.parent


def test_bare_predict_prints_its_usage(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "predict.py")], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and "python predict.py ckpt_path=" in proc.stdout and not proc.stderr, proc


def test_counts_and_the_seeds_hint_read_well():
    from lightning_modules.schedule import Plan
    from pipeline.console import result_block

    metrics = {"stage": "frozen", "backbone": "b", "run_dir": "/r/frozen_b/1", "epochs": 1, "wall_time_s": 2}
    block = result_block(metrics, ["stage=frozen", "data.root=my photos", "seed=3", "trainer.max_epochs=1"])
    assert "  1 epoch, wall time 2 s" in block
    assert "python train.py stage=frozen 'data.root=my photos' trainer.max_epochs=1 'seeds=[1,2,3]'" in block
    assert "..." not in block
    plan = Plan.from_dict(
        {
            "stage": "frozen",
            "phases": [[0, 1, 0]],
            "n_blocks": 5,
            "groups": [["head", 0.1]],
            "scheduler": "none",
            "lr_warmup_epochs": 0,
            "early_stops": [],
        }
    )
    assert "1 epoch," in plan.describe() and "phase 0: epoch 0:" in plan.describe()


def test_the_result_names_the_chosen_epoch_and_says_when_it_is_the_head_warm_up():
    from pipeline.console import result_block

    phases = [
        {"phase": 0, "epochs": [0, 1], "top_blocks": 0},
        {"phase": 1, "epochs": [1, 3], "top_blocks": 2},
        {"phase": 2, "epochs": [3, 5], "top_blocks": 4},
    ]
    metrics = {"stage": "finetune", "backbone": "b", "run_dir": "/r/f/1", "epochs": 5, "phases": phases}
    warm_up = result_block(metrics | {"best_epoch": 0})
    assert "  chosen model         epoch 1 of 5, phase 0 (the head alone), on validation" in warm_up
    assert "note: no fine-tuned epoch beat the head warm-up on validation" in warm_up
    tuned = result_block(metrics | {"best_epoch": 3})
    assert "epoch 4 of 5, phase 2 (the head and the top 4 blocks)" in tuned and "note:" not in tuned
    one_phase = result_block(metrics | {"phases": phases[:1], "epochs": 1, "best_epoch": 0})
    assert "  chosen model         epoch 1 of 1, on validation" in one_phase and "note:" not in one_phase
    assert "chosen model" not in result_block(metrics)  # a WiSE-FT or soup model: no epoch of its own


def test_the_best_epoch_is_read_from_the_best_checkpoints_name_only():
    from lightning_modules.best_checkpoint import best_epoch

    assert best_epoch("/r/checkpoints/best-epoch004-acc0.9910.ckpt") == 4
    assert best_epoch("/r/checkpoints/best-epoch012-acc1.0000-v1.ckpt") == 12
    assert best_epoch("/r/checkpoints/last.ckpt") is None and best_epoch(None) is None
    assert best_epoch("/r/wise/wise-alpha0.5.ckpt") is None
