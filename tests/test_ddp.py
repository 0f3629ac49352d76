"""Two-process DDP on CPU (gloo): every stage, replica agreement, 1-vs-2-process equivalence."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_modules.backbones import build_backbone

from conftest import BACKBONE, ROOT, fast_args
from helpers import checkpoint_state, conv_weights, image_counts, read_metrics, run_dir, run_train, scalar_tags
from toy_data import make_image_tree

# Odd split sizes: a padding sampler would evaluate 16 test images instead of 15.
PER_CLASS = {"train": 24, "validation": 8, "test": 8}


@pytest.fixture(scope="module")
def ddp_root(tmp_path_factory) -> Path:
    root = make_image_tree(tmp_path_factory.mktemp("ddp"), per_class=PER_CLASS, size=32)
    (root / "test" / "dogs" / "dogs.0.png").unlink()  # 15 test images
    return root


# The broken approach, built only here: every phase in one fit, blocks unfrozen inside it after DDP
# wrapped the model (what Lightning's BaseFinetuning does; Lightning #20340).
UNSAFE_SINGLE_FIT = """
import sys
sys.path.insert(0, {root!r})
from pipeline.runner import phases, stages
from lightning_modules.freeze_schedule import ApplyPlan
from lightning_modules.run_safety import EpochTimer
from pipeline.runner.trainer_factory import make_trainer


class SwitchInsideOneFit(ApplyPlan):
    def on_train_epoch_start(self, trainer, pl_module):
        pl_module.set_trainable_top(self.plan.phases[self.plan.phase_index(trainer.current_epoch)].top_blocks)


def one_fit(cfg, build, plan):
    build.model.set_plan(plan)
    timer = EpochTimer()
    trainer = make_trainer(cfg, build.run.path, [SwitchInsideOneFit(plan, 0), timer], max_epochs=plan.epochs)
    phases.fit(trainer, build.model, build.datamodule, None)
    return phases.PhasesDone(trainer, plan, timer, [])


stages.run_phases = one_fit
import train
train.main()
"""


def run_script(args: list[str], cwd: Path, script: Path | None = None) -> subprocess.CompletedProcess:
    """Run train.py (or ``script``) in a fresh process (DDP re-launches it); it must succeed."""
    full_env = {k: v for k, v in os.environ.items() if k != "TRANSFER_RUN_DIR"}
    proc = subprocess.run(
        [sys.executable, str(script or ROOT / "train.py"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def train_subprocess(args: list[str], cwd: Path, script: Path | None = None) -> Path:
    """``run_script``; returns the one run folder both ranks used."""
    run_script(args, cwd, script)
    out_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("out_dir=")))
    runs = [p for p in out_dir.glob(f"*_{BACKBONE}_*/*") if p.is_dir()]
    assert len(runs) == 1, runs  # both ranks used one run folder
    return runs[0]


def ddp_finetune_args(root: Path, out: Path, weights: Path, **extra: str) -> list[str]:
    return fast_args(
        root,
        out,
        stage="finetune",
        **{
            "model.weights": str(weights),
            "trainer.devices": "2",
            "finetune.warmup_epochs": "1",
            "finetune.unfreeze_blocks": "1",
            "trainer.max_epochs": "3",
            "data.batch_size": "4",
            "optim.lr": "1e-3",
        }
        | extra,
    )


def _replica_diffs(run: Path) -> list[float]:
    return [v for _, v in sorted(scalar_tags(run)["ddp/differing_tensors"])]


def test_unfrozen_blocks_train_identically_on_every_rank(ddp_root, tmp_path, weights_file):
    run = train_subprocess(ddp_finetune_args(ddp_root, tmp_path / "out", weights_file), tmp_path)
    diffs = _replica_diffs(run)
    assert len(diffs) == 3 and max(diffs) == 0.0, diffs  # bit-identical at the end of every epoch
    print(f"\nreplica differences per epoch: {diffs}")

    pretrained = {f"backbone.{k}": v for k, v in build_backbone(BACKBONE, weights=weights_file).state_dict().items()}
    after = checkpoint_state(run / "checkpoints" / "last.ckpt")
    lower = [k for k in pretrained if not k.startswith("backbone.blocks.4.")]
    top_convs = conv_weights(pretrained, 4)
    assert all(torch.equal(pretrained[k], after[k]) for k in lower), "a lower block changed under DDP"
    assert all(not torch.equal(pretrained[k], after[k]) for k in top_convs), "the unfrozen block did not train"

    metrics = read_metrics(run)
    assert metrics["val"]["count"] == 16 and metrics["test"]["count"] == 15  # every image once, none twice
    assert metrics["test"]["acc"] >= 0.7


@pytest.mark.slow  # a two-process run: the default suite keeps the unfreeze test (4-minute budget)
def test_replica_check_catches_unsynchronised_unfrozen_blocks(ddp_root, tmp_path, weights_file):
    """The broken approach (one fit, blocks unfrozen after DDP wrapped the model) must be detected."""
    args = ddp_finetune_args(ddp_root, tmp_path / "out", weights_file)
    script = tmp_path / "unsafe_single_fit.py"
    script.write_text(UNSAFE_SINGLE_FIT.format(root=str(ROOT)))
    run = train_subprocess(args, tmp_path, script)
    diffs = _replica_diffs(run)
    print(f"\nreplica differences per epoch, unfrozen blocks not synchronised: {diffs}")
    assert diffs[0] == 0.0  # warm-up: only the (synchronised) head trains
    assert diffs[-1] > 0.0, diffs  # after the unfreeze the replicas drift apart


@pytest.mark.slow  # a two-process run: the default suite keeps the unfreeze test (4-minute budget)
def test_two_processes_match_one_process_with_double_batch(ddp_root, tmp_path, weights_file, monkeypatch):
    common = {
        "data.augment": "none",
        "model.dropout": "0.0",
        "trainer.deterministic": "true",
        "optim.name": "sgd",
        "optim.lr": "0.05",
    }
    two = train_subprocess(
        ddp_finetune_args(ddp_root, tmp_path / "two", weights_file, **common, **{"data.batch_size": "4"}), tmp_path
    )
    # the one-process run in this process (a fresh interpreter costs seconds); Lightning's
    # deterministic mode is process-wide, so it is put back afterwards
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        one = run_dir(
            run_train(
                ddp_finetune_args(
                    ddp_root,
                    tmp_path / "one",
                    weights_file,
                    **common,
                    **{"data.batch_size": "8", "trainer.devices": "1"},
                )
            )
        )
    finally:
        torch.use_deterministic_algorithms(deterministic)
    a = checkpoint_state(two / "checkpoints" / "last.ckpt")
    b = checkpoint_state(one / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
    # float32, 18 SGD steps: only the order of the gradient sums differs (all-reduce vs one batch)
    assert worst < 1e-4, worst
    ma, mb = read_metrics(two), read_metrics(one)
    for split in ("val", "test"):
        assert ma[split]["count"] == mb[split]["count"]
        assert ma[split]["acc"] == pytest.approx(mb[split]["acc"], abs=1e-6)
        assert ma[split]["loss"] == pytest.approx(mb[split]["loss"], abs=1e-4)
    print(f"\nlargest weight difference 1-process vs 2-process: {worst:.3g}")


@pytest.mark.slow  # a two-process run: the default suite keeps the unfreeze test (4-minute budget)
def test_features_and_test_stages_under_ddp(ddp_root, tmp_path):
    out = tmp_path / "out"
    args = fast_args(ddp_root, out, stage="features", **{"trainer.devices": "2", "eval.temperature": "fit"})
    run = train_subprocess(args, tmp_path)
    metrics = read_metrics(run)
    assert metrics["feature_cache"]["built"] is True
    assert len(list((out / "cache").glob("*.pt"))) == 1  # one writer
    assert metrics["test"]["count"] == 15 and metrics["test"]["acc"] >= 0.7
    # only rank zero writes event files: they all come from one process id
    assert len({p.name.split(".")[-2] for p in run.glob("events.out.tfevents.*")}) == 1

    test_out = tmp_path / "test_out"
    test_run = train_subprocess(
        fast_args(ddp_root, test_out, stage="test", ckpt_path=metrics["best_ckpt"], **{"trainer.devices": "2"}),
        tmp_path,
    )
    tested = read_metrics(test_run)
    assert tested["test"]["count"] == 15
    assert tested["test"]["acc"] == pytest.approx(metrics["test"]["acc"])
    # the temperature fitted under DDP is in the checkpoint: the same calibrated figures
    assert metrics["calibration"]["temperature"] != 1.0
    for key in ("loss", "ece"):
        assert tested["test"][key] == pytest.approx(metrics["test"][key], abs=1e-4), key


@pytest.mark.slow  # a two-process run: the default suite keeps the unfreeze test (4-minute budget)
def test_frozen_stage_under_ddp(ddp_root, tmp_path):
    # with TensorBoard's views on: every rank joins their gathers (a rank that skipped one would hang)
    views = {"trainer.devices": "2", "log.images_every_n_epochs": "1"}
    run = train_subprocess(fast_args(ddp_root, tmp_path / "out", stage="frozen", **views), tmp_path)
    metrics = read_metrics(run)
    assert metrics["epochs"] == 3 and metrics["test"]["count"] == 15
    assert max(_replica_diffs(run)) == 0.0
    assert image_counts(run)["val/confusion_matrix"] == 3  # gathered from both shards, written by rank zero
    assert sorted(p.name for p in run.iterdir() if p.is_file() and not p.name.startswith("events")) == [
        "config.yaml",
        "hparams.yaml",
        "metrics.csv",  # written by rank zero, one row per epoch
        "metrics.json",
        "plan.png",
        "reliability_test.png",
        "run.json",  # written once, by rank zero
        "test_predictions.csv",
    ]
    # per-image predictions gathered from uneven shards (8 + 7) are put back in dataset order:
    # every row's target is its file's class folder, and its prediction agrees with the accuracy
    with open(run / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 15 and [r["file"] for r in rows] == sorted(r["file"] for r in rows)
    assert all(r["target"] == Path(r["file"]).parent.name for r in rows)
    correct = sum(r["predicted"] == r["target"] for r in rows)
    assert correct / 15 == pytest.approx(metrics["test"]["acc"])
    with open(run / "metrics.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2]


def test_a_split_smaller_than_the_world_is_refused_before_any_process_starts(capsys, tmp_path):
    """With fewer validation images than processes one rank would get none, and the others would
    wait for it forever in the metrics' synchronisation: refused up front, in one line."""
    import train

    root = make_image_tree(tmp_path / "d", per_class={"train": 4, "validation": 1, "test": 2}, size=16)
    with pytest.raises(SystemExit) as exc:
        train.main(fast_args(root, tmp_path / "out", stage="frozen", **{"trainer.devices": "3"}))
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("INFO")]
    assert len(err) == 1 and "the val split has 2 image(s), fewer than the 3 processes" in err[0], err


@pytest.mark.slow  # a two-process run: the default suite keeps the unfreeze test (4-minute budget)
def test_a_sweep_under_ddp_keeps_every_cells_files(ddp_root, tmp_path):
    """Lightning's DDP workers re-run the whole sweep command: only rank zero may delete a cell it
    is about to start or write results and summaries (a worker once deleted the cell rank zero was
    writing, because it found no last.ckpt there yet)."""
    out = tmp_path / "out"
    args = fast_args(ddp_root, out, stage="frozen", **{"trainer.devices": "2", "trainer.max_epochs": "1"})
    proc = run_script([*args, "seeds=[1,2]"], tmp_path)
    (parent,) = list((out / "sweeps").iterdir())
    summary = json.loads((parent / "summary.json").read_text())
    assert [row["status"] for row in summary["rows"]] == ["ok", "ok"]
    for row in summary["rows"]:
        folder = Path(row["run_dir"])
        assert (folder / "metrics.json").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
        assert (folder.parent.parent / "result.json").is_file()
    assert proc.stdout.count("sweep: summary in") == 1  # printed (and written) by one process


@pytest.mark.slow  # a two-process run: the default suite keeps the unfreeze test (4-minute budget)
def test_wise_and_l2sp_under_ddp(ddp_root, tmp_path, weights_file):
    """L2-SP's penalty and WiSE-FT's choice under two processes: replicas stay bit-identical and
    every rank evaluates and saves the same interpolated model."""
    args = ddp_finetune_args(
        ddp_root, tmp_path / "out", weights_file, **{"finetune.l2sp": "0.1", "finetune.wise": "[0,0.5,1]"}
    )
    run = train_subprocess(args, tmp_path)
    assert max(_replica_diffs(run)) == 0.0
    metrics = read_metrics(run)
    assert [p["a"] for p in metrics["wise"]["curve"]] == [0.0, 0.5, 1.0]
    assert Path(metrics["best_ckpt"]).name == f"wise-a{metrics['wise']['chosen_a']:.2f}.ckpt"
    assert metrics["test"]["count"] == 15
