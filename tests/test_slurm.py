"""Studies and DDP on a real one-node SLURM cluster (tests/slurm_cluster.py; skipped without SLURM)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_ddp import ddp_finetune_args, train_subprocess

from conftest import ROOT, fast_args
from helpers import checkpoint_state, comparable, read_metrics, run_train, study_args

pytestmark = pytest.mark.slow


def _srun(cluster, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["srun", "-N1", *args], cwd=cwd, env=cluster.env, capture_output=True, text=True, timeout=600, check=False
    )


def test_the_cluster_runs_a_batch_job(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    slurm_cluster.run("sbatch", "--wait", f"--output={out}", "--wrap", "echo ran on $SLURM_NODELIST")
    assert out.read_text().startswith("ran on ")


def test_a_study_as_a_job_array_gives_the_serial_summary(slurm_cluster, toy_root, tmp_path, weights_file):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    weights = [str(weights_file), str(broken)]
    serial = run_train(study_args(toy_root, tmp_path / "serial", weights))
    args = [*study_args(toy_root, tmp_path / "slurm", weights), "launch=slurm", "launch.cpus_per_cell=1"]
    submitted = run_train(args)  # launch.wait=false: submitted, no summary yet
    assert submitted["submitted"] and not (Path(submitted["parent"]) / "summary.md").exists()
    slurm = run_train([*args, "launch.wait=true"])  # the same study: waits for its array, not a second one
    assert [r["status"] for r in slurm["rows"]] == ["ok", "ok", "failed", "failed"]
    assert comparable(Path(serial["parent"]) / "summary.md") == comparable(Path(slurm["parent"]) / "summary.md")


def test_srun_ntasks_is_refused_in_one_line(slurm_cluster, toy_root, tmp_path, weights_file):
    args = ddp_finetune_args(toy_root, tmp_path / "out", weights_file, **{"trainer.strategy": "ddp"})
    proc = _srun(slurm_cluster, "-n2", sys.executable, str(ROOT / "train.py"), *args, cwd=tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("use srun --ntasks-per-node=2 matching trainer.devices=2" in e for e in errors), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_srun_ntasks_per_node_trains_as_lightnings_own_ddp(slurm_cluster, toy_root, tmp_path, weights_file):
    common = {"data.augment": "none", "model.dropout": "0.0", "trainer.strategy": "ddp"}
    args = ddp_finetune_args(toy_root, tmp_path / "srun", weights_file, **common)
    proc = _srun(slurm_cluster, "--ntasks-per-node=2", sys.executable, str(ROOT / "train.py"), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = [p for p in (tmp_path / "srun").glob("*_tiny_cnn_*/*") if p.is_dir()]
    assert len(runs) == 1 and runs[0].name.startswith("job-"), runs  # both tasks used one run folder
    own = train_subprocess(ddp_finetune_args(toy_root, tmp_path / "own", weights_file, **common), tmp_path)
    a, b = checkpoint_state(runs[0] / "checkpoints" / "last.ckpt"), checkpoint_state(own / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    ma, mb = read_metrics(runs[0]), read_metrics(own)
    assert {s: ma[s] for s in ("val", "test")} == {s: mb[s] for s in ("val", "test")}


def _requeue_args(root: Path, out: Path, weights: Path) -> list[str]:
    extra = {"trainer.max_epochs": "12", "data.image_size": "64", "data.batch_size": "4", "seeds": "[3]"}
    return [a for a in fast_args(root, out, stage="frozen", **extra) if not a.startswith("model.weights=")] + [
        f"model.weights={weights}"
    ]


def test_a_requeued_cell_resumes_to_the_uninterrupted_result(slurm_cluster, toy_root, tmp_path, weights_file):
    reference = run_train(_requeue_args(toy_root, tmp_path / "serial", weights_file))["rows"][0]
    args = [*_requeue_args(toy_root, tmp_path / "slurm", weights_file), "launch=slurm"]
    parent = Path(run_train(args)["parent"])
    job = (parent / "launch" / "slurm_job.txt").read_text().strip()
    last = None
    deadline = time.time() + 300
    while time.time() < deadline:  # requeue once the cell has saved an epoch and still trains
        last = next(parent.glob("cell*/*/run/checkpoints/last.ckpt"), None)
        if last is not None:
            break
        time.sleep(0.2)
    assert last is not None, slurm_cluster.logs()
    slurm_cluster.run("scontrol", "requeue", job)
    row = run_train([*args, "launch.wait=true"])["rows"][0]
    logs = "".join(p.read_text() for p in (parent / "submitit").glob("*.out"))
    assert "resuming" in logs, logs[-3000:]
    assert row["status"] == "ok" and row["val"] == reference["val"] and row["test"] == reference["test"]
    ours, theirs = Path(row["run_dir"]), Path(reference["run_dir"])
    a, b = checkpoint_state(ours / "checkpoints" / "last.ckpt"), checkpoint_state(theirs / "checkpoints" / "last.ckpt")
    assert all(a[k].equal(b[k]) for k in a)
    same = ("stage", "backbone", "epochs", "val", "test")  # not the timings, memory and paths
    assert {k: read_metrics(ours)[k] for k in same} == {k: read_metrics(theirs)[k] for k in same}


def test_a_search_on_slurm_equals_the_serial_search(slurm_cluster, toy_root, tmp_path):
    """An Optuna search whose trials run as SLURM job arrays (two at a time; waiting is implied)."""
    from test_search import same_trials, search_args

    serial = run_train(search_args(toy_root, tmp_path / "serial", "search.trials=2"))
    args = search_args(toy_root, tmp_path / "slurm", "search.trials=2", "launch=slurm", "launch.parallel=2")
    slurm = run_train([*args, "launch.cpus_per_cell=1"])
    assert same_trials(serial, slurm)
    assert (Path(slurm["parent"]) / "submitit").is_dir()
