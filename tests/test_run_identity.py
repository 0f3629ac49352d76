"""A run's identity is checked wherever a checkpoint is reused, and run folders are never shared."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from core.errors import ConfigError
from pipeline.config.load import load_config
from pipeline.runner.run_dir import RUN_RECORD, claim, latest_run, release_all, resolve_run

from conftest import BACKBONE, ROOT, fast_args, finetune_args
from helpers import checkpoint_state, release_together, run_dir, run_group, run_train, sigterm_at_step
from toy_data import make_image_tree


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A 1-epoch frozen run on toy data, and a copy of the data with class ``dogs`` renamed ``wolves``.
    Two validation cats are filed as dogs: without errors the toy validation split is separable and
    the temperature's fit runs away before the split's size is judged."""
    base = tmp_path_factory.mktemp("identity")
    root = make_image_tree(base / "toy")
    for i in (0, 1):
        shutil.move(root / "validation" / "cats" / f"cats.{i}.png", root / "validation" / "dogs" / f"cat{i}.png")
    other = base / "relabelled" / "toy"  # the same folder name: ckpt_path=last looks among the same runs
    shutil.copytree(root, other)
    for split in ("train", "validation", "test"):
        (other / split / "dogs").rename(other / split / "wolves")
    out = base / "out"
    metrics = run_train(fast_args(root, out, stage="frozen", **{"trainer.max_epochs": "1"}))
    return {"root": root, "other": other, "out": out, "metrics": metrics}


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def _refused(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        train.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_resume_onto_relabelled_data_is_refused_and_writes_nothing(trained, capsys):
    folder = run_dir(trained["metrics"])
    group = run_group(trained["out"], "frozen", trained["root"])  # also the relabelled copy's: both are named toy
    before = _snapshot(group)  # out/cache may gain the other folder's scan
    last = folder / "checkpoints" / "last.ckpt"
    err = _refused(fast_args(trained["other"], trained["out"], stage="frozen", ckpt_path=str(last)), capsys)
    assert "cannot resume" in err and "['cats', 'dogs'] -> ['cats', 'wolves']" in err and "data.root" in err
    # ckpt_path=last finds no run with this identity, and names what differs in the newest one
    err = _refused(fast_args(trained["other"], trained["out"], stage="frozen", ckpt_path="last"), capsys)
    assert "ckpt_path=last" in err and "classes" in err
    assert _snapshot(group) == before  # no run file written or touched


def test_resume_with_other_preprocessing_names_each_item(trained, capsys):
    last = run_dir(trained["metrics"]) / "checkpoints" / "last.ckpt"
    args = fast_args(trained["root"], trained["out"], stage="frozen", ckpt_path=str(last), **{"data.image_size": "40"})
    args += ["data.augment=none", "optim.class_weights=[1.0,2.0]"]
    err = _refused(args, capsys)
    for item in ("data.image_size 32 -> 40", "data.augment seed -> none", "class_weights None -> [1.0, 2.0]"):
        assert item in err, err


def test_init_ckpt_from_other_data_is_refused(trained, tmp_path, capsys):
    best = trained["metrics"]["best_ckpt"]
    args = finetune_args(trained["other"], tmp_path / "ft", **{"finetune.init_ckpt": best})
    err = _refused(args, capsys)
    assert err.startswith("error: finetune.init_ckpt") and "wolves" in err
    assert not (tmp_path / "ft").exists() or not any((tmp_path / "ft").rglob("run.json"))
    # the same data with another augmentation is a fine-tune's own choice: accepted
    ok = run_train(
        finetune_args(trained["root"], tmp_path / "ft2", **{"finetune.init_ckpt": best})
        + [
            "data.augment=none",
            "trainer.max_epochs=1",
            "finetune.warmup_epochs=0",
        ]
    )
    assert ok["test"]["count"] == 16


def test_stage_test_checks_classes_and_the_recorded_split(trained, tmp_path, capsys, caplog):
    best = trained["metrics"]["best_ckpt"]
    err = _refused(fast_args(trained["other"], tmp_path / "t1", stage="test", ckpt_path=best), capsys)
    assert "names and order must match" in err
    # another folder with the same classes: evaluated, and said so
    elsewhere = tmp_path / "photos"
    shutil.copytree(trained["root"], elsewhere)
    tested = run_train(fast_args(elsewhere, tmp_path / "t2", stage="test", ckpt_path=best))
    assert tested["test"]["count"] == 16
    assert "not the folder this checkpoint was trained on" in caplog.text
    # the training folder with a changed test split could test on training images: refused
    extra = trained["root"] / "test" / "cats" / "extra.png"
    shutil.copy(next((trained["root"] / "train" / "cats").iterdir()), extra)
    try:
        err = _refused(fast_args(trained["root"], tmp_path / "t3", stage="test", ckpt_path=best), capsys)
        assert "16 -> 17 files" in err
    finally:
        extra.unlink()


def _fake_run(group: Path, name: str, started: float, identity: dict, job: str | None = None) -> Path:
    folder = group / name
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    record = {"started": started, "identity": identity, "slurm_job": job}
    (folder / RUN_RECORD).write_text(json.dumps(record))
    return folder


def _cfg(out: Path, root: Path):
    return load_config(
        ["stage=frozen", f"out_dir={out}", "model.backbone=resnet18", "model.pretrained=false", f"data.root={root}"]
    )


def test_ckpt_path_last_is_the_newest_start_with_the_same_identity(tmp_path):
    cfg = _cfg(tmp_path, tmp_path / "photos")
    group = tmp_path / "frozen_resnet18_photos"
    mine, other = {"classes": ["a", "b"]}, {"classes": ["a", "c"]}
    _fake_run(group, "20260101-000000", 100.0, mine)
    newest_mine = _fake_run(group, "20250101-000000", 300.0, mine)  # an older name, started later
    _fake_run(group, "job-99", 200.0, mine)  # sorts after every timestamp by name
    _fake_run(group, "20270101-000000", 400.0, other)  # newest of all, other data
    assert latest_run(cfg, mine) == newest_mine
    with pytest.raises(ConfigError, match="differs in: classes"):
        latest_run(cfg, {"classes": ["x", "y"]})


def test_ckpt_path_last_looks_only_among_runs_of_its_data_set(tmp_path):
    """Each data folder has its runs' folder (``<stage>_<backbone>_<data folder>``); an older
    version's folder (``<stage>_<backbone>``, every data set in it) is read for runs that recorded
    this data folder."""
    photos, shared = tmp_path / "data" / "photos", tmp_path / "data" / "shared"
    mine = {"data.root": str(photos.resolve()), "classes": ["a", "b"]}
    theirs = {"data.root": str(shared.resolve()), "classes": ["a", "b"]}
    legacy = tmp_path / "frozen_resnet18"
    old_mine = _fake_run(legacy, "20250101-000000", 100.0, mine)
    old_theirs = _fake_run(legacy, "20250102-000000", 200.0, theirs)  # newer, of the other data folder
    assert latest_run(_cfg(tmp_path, photos), mine) == old_mine
    assert latest_run(_cfg(tmp_path, shared), theirs) == old_theirs
    new_theirs = _fake_run(tmp_path / "frozen_resnet18_shared", "20260101-000000", 300.0, theirs)
    assert latest_run(_cfg(tmp_path, photos), mine) == old_mine  # the other data set's newer run is not seen
    assert latest_run(_cfg(tmp_path, shared), theirs) == new_theirs
    third = {"data.root": str((tmp_path / "data" / "third").resolve()), "classes": ["a", "b"]}
    assert latest_run(_cfg(tmp_path, tmp_path / "data" / "third"), third) is None  # none of its own: a new run


def test_two_data_folders_get_two_tensorboard_runs_and_resume_their_own(tmp_path, capsys):
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    roots = [make_image_tree(tmp_path / name) for name in ("photos_300", "cats_and_dogs_small")]
    out = tmp_path / "runs"
    first = [run_dir(run_train(fast_args(r, out, stage="frozen", **{"trainer.max_epochs": "1"}))) for r in roots]
    tensorboard = EventMultiplexer().AddRunsFromDirectory(str(out))  # as `tensorboard --logdir runs` names them
    names = sorted(tensorboard.Runs())
    assert names == sorted(f"frozen_{BACKBONE}_{r.name}/{f.name}" for r, f in zip(roots, first, strict=True)), names
    capsys.readouterr()
    resumed = run_train(fast_args(roots[0], out, stage="frozen", ckpt_path="last", **{"trainer.max_epochs": "2"}))
    assert run_dir(resumed) == first[0] and resumed["epochs"] == 2, capsys.readouterr().out
    assert len(list(run_group(out, "frozen", roots[1]).iterdir())) == 1  # the other data set's run untouched


def test_a_requeued_slurm_job_resumes_its_own_run(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, tmp_path / "photos")
    group = tmp_path / "frozen_resnet18_photos"
    identity = {"classes": ["a", "b"]}
    own = _fake_run(group, "20260101-000000", 100.0, identity, job="4242")
    _fake_run(group, "20260102-000000", 200.0, identity, job="5151")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    try:
        folder, ckpt = resolve_run(cfg, identity=identity)
    finally:
        release_all()
    assert folder == own and ckpt == str(own / "checkpoints" / "last.ckpt")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the first start of a job: a new run
    try:
        folder, ckpt = resolve_run(cfg, identity=identity)
    finally:
        release_all()
    assert ckpt is None and folder not in (own,) and (folder / RUN_RECORD).is_file()
    assert json.loads((folder / RUN_RECORD).read_text())["slurm_job"] == "4242"


CONCURRENT = """
import os, sys, time
sys.path.insert(0, {root!r})
from omegaconf import OmegaConf
from pipeline.runner.run_dir import new_run_dir
# the keys new_run_dir reads; a light process (no torch), so the four start within a second
cfg = OmegaConf.create({{"stage": "frozen", "out_dir": sys.argv[1], "model": {{"backbone": "resnet18"}}}})
open(sys.argv[2] + "." + str(os.getpid()) + ".ready", "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
print(new_run_dir(cfg))
"""


def test_runs_launched_at_the_same_instant_get_distinct_folders(tmp_path):
    script = tmp_path / "new_dir.py"
    script.write_text(CONCURRENT.format(root=str(ROOT)))
    go = tmp_path / "go"  # every process is up and spinning until it appears
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"), str(go)], stdout=subprocess.PIPE)
        for _ in range(4)
    ]
    release_together(go, procs)
    folders = [p.communicate(timeout=60)[0].decode().strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(folders)) == 4, folders
    assert all((Path(f) / RUN_RECORD).is_file() for f in folders)


HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from pipeline.runner.run_dir import claim
claim(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(30)
"""


def test_a_run_folder_in_use_is_refused(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    script = tmp_path / "hold.py"
    script.write_text(HOLD.format(root=str(ROOT)))
    holder = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(ConfigError, match="in use by another process"):
            claim(folder)
    finally:
        holder.kill()
        holder.wait()
    claim(folder)  # free again once the holder is gone
    release_all()


def test_limit_eval_batches_are_refused_up_front(tmp_path):
    for key in ("limit_val_batches", "limit_test_batches"):
        with pytest.raises(ConfigError, match=f"trainer.{key}=0.5 is not supported"):
            load_config(fast_args(tmp_path, tmp_path, stage="frozen", **{f"trainer.{key}": "0.5"}))


def test_slurm_auto_requeue_is_off_and_stray_hpc_checkpoints_are_not_loaded(tmp_path, monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from pipeline.runner.trainer_factory import make_trainer

    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "7"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"someone else's")
    cfg = load_config(fast_args(tmp_path, tmp_path / "out", stage="frozen"))
    folder = tmp_path / "out" / "run"
    folder.mkdir(parents=True)
    trainer = make_trainer(cfg, folder, [])
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False
    assert trainer._checkpoint_connector._hpc_resume_path is None
    asked = make_trainer(
        load_config([*fast_args(tmp_path, tmp_path / "out", stage="frozen"), "slurm_requeue=true"]), folder, []
    )
    assert asked._accelerator_connector.cluster_environment.auto_requeue is True


def test_sigint_stops_at_a_step_boundary_and_resumes_exactly(toy_root, tmp_path, monkeypatch, capsys):
    """Ctrl+C is handled like SIGTERM: the running step finishes, last.ckpt is written, exit 130,
    and the resumed run ends with the uninterrupted run's weights."""
    args = fast_args(toy_root, tmp_path / "whole", stage="frozen", **{"trainer.max_epochs": "2"})
    whole = run_train(args)
    sigterm_at_step(monkeypatch, 4, signal.SIGINT)
    split = fast_args(toy_root, tmp_path / "split", stage="frozen", **{"trainer.max_epochs": "2"})
    with pytest.raises(SystemExit) as exc:
        train.main(split)
    assert exc.value.code == 130
    assert "SIGINT" in capsys.readouterr().err
    monkeypatch.undo()
    last = next(run_group(tmp_path / "split", "frozen", toy_root).glob("*/checkpoints/last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == 5  # the step that was running finished
    resumed = run_train([*split, "ckpt_path=last"])
    a = checkpoint_state(run_dir(whole) / "checkpoints" / "last.ckpt")
    b = checkpoint_state(run_dir(resumed) / "checkpoints" / "last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_toy_runs_temperature_is_refused_and_recorded(trained):
    """16 validation images cannot support a temperature: T=1 in metrics.json and the checkpoint."""
    calibration = trained["metrics"]["calibration"]
    assert calibration["kept"] is False and calibration["temperature"] == 1.0
    assert "16 images" in calibration["reason"]
    assert float(checkpoint_state(Path(calibration["stored_in"]))["temperature"]) == 1.0
