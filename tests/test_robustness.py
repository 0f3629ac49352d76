"""Interrupted runs, bad files, bad input, NaN losses and unsafe pickles."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from core.atomic_io import write_json_atomic
from datamodules.data_index import scan_splits
from datamodules.image_folder import ImageFolderDataModule
from datamodules.layout import DataLayoutError
from lightning_modules.run_safety import AtomicCheckpointIO

from conftest import BACKBONE, fast_args, finetune_args
from helpers import (
    after_event_files,
    checkpoint_state,
    largest_weight_difference,
    read_metrics,
    run_dir,
    run_group,
    run_train,
    scalar_tags,
    sigterm_then_resume,
    wait_for_file,
)
from toy_data import make_image_tree


def _error_line(capsys, args: list[str], code: int = 2) -> str:
    with pytest.raises(SystemExit) as exc:
        train.main(args)
    assert exc.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# --- bad image files -------------------------------------------------------------------------

GOOD_ODD = [
    "gray.png",
    "palette.png",
    "palette_transparent.gif",
    "rgba.png",
    "cmyk.jpg",
    "sixteen_bit.png",
    "image.webp",
    "wide_10500px.png",
    "tiny_4px.png",
]
BAD = {
    "truncated.jpg": "truncated",
    "zero.jpg": "cannot identify",
    "text.jpg": "cannot identify",
    "bomb.png": "too large",
    "notes.txt": "not an image",
    ".DS_Store": "hidden",
    "._cat.jpg": "hidden",
}


def _write_odd_files(folder: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("P").save(folder / "palette.png")
    transparent = rgb.convert("P")
    transparent.info["transparency"] = 0
    transparent.save(folder / "palette_transparent.gif", transparency=0)
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(folder / "sixteen_bit.png")
    rgb.save(folder / "image.webp")
    Image.new("RGB", (10_500, 60), (200, 30, 30)).save(folder / "wide_10500px.png")
    Image.new("RGB", (4, 4), (200, 30, 30)).save(folder / "tiny_4px.png")
    buffer = folder / "full.jpg"
    rgb.resize((200, 200)).save(buffer, quality=95)
    data = buffer.read_bytes()
    buffer.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not a picture")
    Image.new("1", (20_000, 10_000)).save(folder / "bomb.png")  # 200 megapixels, a few KB on disk
    (folder / "notes.txt").write_text("x")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "._cat.jpg").write_bytes(b"\0\5\26\7")


@pytest.fixture(scope="module")
def messy_root(tmp_path_factory) -> Path:
    root = make_image_tree(tmp_path_factory.mktemp("messy"), size=32)
    _write_odd_files(root / "train" / "cats")
    return root


def test_odd_images_load_and_bad_files_are_skipped_and_listed(messy_root):
    index = scan_splits(messy_root, threads=2)
    skipped = {Path(p).name: reason for p, reason in index.skipped["train"]}
    assert set(skipped) == set(BAD)
    for name, fragment in BAD.items():
        assert fragment in skipped[name], (name, skipped[name])
    loaded = {Path(p).name for p, _ in index.samples["train"]}
    assert set(GOOD_ODD) <= loaded and not set(BAD) & loaded
    assert index.counts()["train"] == 48 + len(GOOD_ODD)
    assert index.skipped["val"] == [] and index.skipped["test"] == []

    dm = ImageFolderDataModule(index, image_size=24, batch_size=4, num_workers=0, augment="seed")
    dm.setup("fit")
    dataset = dm.datasets["train"]
    for i, (path, _) in enumerate(dataset.samples):
        if Path(path).name in GOOD_ODD:
            image, _ = dataset[(0, i)]
            assert image.shape == (3, 24, 24) and torch.isfinite(image).all(), path


def test_sixteen_bit_and_transparent_images_are_converted_faithfully(tmp_path):
    from datamodules.image_io import load_rgb

    Image.fromarray(np.full((8, 8), 65535 // 2, dtype=np.uint16)).save(tmp_path / "mid.png")
    assert load_rgb(tmp_path / "mid.png").getpixel((0, 0)) == (127, 127, 127)  # not clipped to white
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_rgb(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # composited on white


def test_skips_never_stop_a_run_and_are_listed_in_the_run_folder(messy_root, tmp_path):
    metrics = run_train(fast_args(messy_root, tmp_path, stage="frozen", **{"trainer.max_epochs": "1"}))
    listing = (run_dir(metrics) / "skipped_files.tsv").read_text().splitlines()
    assert listing[0] == "split\tfile\treason"
    assert sorted(Path(line.split("\t")[1]).name for line in listing[1:]) == sorted(BAD)
    assert metrics["test"]["count"] == 16


def test_strict_mode_makes_bad_files_an_error(capsys, messy_root, tmp_path):
    err = _error_line(capsys, fast_args(messy_root, tmp_path, **{"data.skip_bad_files": "false"}))
    assert "bad file(s)" in err and "data.skip_bad_files=false" in err


def test_layout_errors_come_before_any_model_is_built(capsys, tmp_path, monkeypatch):
    import pipeline.runner.build

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the data layout was checked")

    monkeypatch.setattr(pipeline.runner.build, "build_model", no_model)
    root = make_image_tree(tmp_path / "d", per_class={"train": 2, "validation": 2, "test": 2}, size=16)
    for f in (root / "test" / "cats").iterdir():
        f.unlink()
    (root / "test" / "cats" / "readme.txt").write_text("no images here")
    err = _error_line(capsys, fast_args(root, tmp_path))
    assert "has no image files" in err and "expected layout" in err


def test_split_with_only_unreadable_images_for_a_class_is_an_error(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class={"train": 2, "validation": 2, "test": 2}, size=16)
    for f in (root / "validation" / "dogs").iterdir():
        f.write_bytes(b"")
    with pytest.raises(DataLayoutError, match=r"no readable images for class\(es\) \['dogs'\]"):
        scan_splits(root)


# --- configuration and checkpoint problems ---------------------------------------------------


def test_missing_checkpoint_is_one_clear_line(capsys, toy_root, tmp_path):
    err = _error_line(capsys, fast_args(toy_root, tmp_path, ckpt_path=str(tmp_path / "nope.ckpt")))
    assert "does not exist" in err


def test_checkpoint_of_another_backbone_is_refused(capsys, toy_root, tmp_path):
    trained = run_train(fast_args(toy_root, tmp_path, stage="frozen", **{"trainer.max_epochs": "1"}))
    args = fast_args(
        toy_root, tmp_path, stage="test", ckpt_path=trained["best_ckpt"], **{"model.backbone": "mobilenet_v3_large"}
    )
    err = _error_line(capsys, args)
    assert f"trained with backbone '{BACKBONE}'" in err


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickles_are_refused_without_running_them(capsys, toy_root, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {}, "x": _Payload(marker)}, f)
    err = _error_line(capsys, fast_args(toy_root, tmp_path, stage="test", ckpt_path=str(evil)))
    assert "cannot be loaded safely with weights_only=True" in err
    err = _error_line(capsys, fast_args(toy_root, tmp_path, **{"model.weights": str(evil)}))
    assert "weights_only=True" in err
    assert not marker.exists(), "the pickled payload ran"


# --- NaN losses and atomic writes ------------------------------------------------------------


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(capsys, toy_root, tmp_path, monkeypatch):
    from lightning_modules.classifier import TransferClassifier

    original = TransferClassifier._loss

    def poisoned(self, logits, target):
        loss = original(self, logits, target)
        return loss * float("nan") if self.global_step >= 8 else loss

    monkeypatch.setattr(TransferClassifier, "_loss", poisoned)
    err = _error_line(capsys, fast_args(toy_root, tmp_path, stage="frozen"), code=3)
    assert "training loss is nan at global step 8 (epoch 1, batch 2)" in err
    last = next(run_group(tmp_path, "frozen", toy_root).glob("*/checkpoints/last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == 6  # the end of epoch 0, intact


def test_checkpoint_and_metrics_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def crash(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind

    metrics = tmp_path / "metrics.json"
    write_json_atomic(metrics, {"ok": 1})
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        write_json_atomic(metrics, {"ok": 2})
    assert metrics.read_text().strip().endswith("}") and '"ok": 1' in metrics.read_text()


# --- resuming --------------------------------------------------------------------------------


def _resume_args(root: Path, out: Path, **extra: str) -> list[str]:
    return finetune_args(
        root,
        out,
        **{
            "data.augment": "standard",
            "trainer.deterministic": "true",
            "data.num_workers": "2",
            "trainer.max_epochs": "4",
        }
        | extra,
    )


def test_resume_after_the_unfreeze_is_exactly_the_uninterrupted_run(toy_root, tmp_path, uninterrupted):
    whole = uninterrupted(lambda out: _resume_args(toy_root, out))
    first = run_train(_resume_args(toy_root, tmp_path / "split", **{"trainer.max_epochs": "3"}))
    resumed = run_train([*_resume_args(toy_root, tmp_path / "split"), "ckpt_path=last"])
    assert resumed["run_dir"] == first["run_dir"]
    a = checkpoint_state(run_dir(whole) / "checkpoints" / "last.ckpt")
    b = checkpoint_state(run_dir(resumed) / "checkpoints" / "last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert resumed["val"] == whole["val"] and resumed["test"] == whole["test"]


@pytest.mark.parametrize("augment", ["standard", "robust"])
def test_sigterm_mid_epoch_saves_and_resumes_exactly(toy_root, tmp_path, monkeypatch, capsys, augment, uninterrupted):
    """In-process: SIGTERM arrives at step 9 (mid-epoch 1 of 6-step epochs); the resumed run ends
    with the same weights as an uninterrupted one (stateful loader + per-step/per-sample seeds; the
    robust preset's downscaling, JPEG quality and blur draws included). The standard preset's
    uninterrupted run is the one the test above resumes at an epoch boundary."""
    settings = {"data.augment": augment}
    whole = uninterrupted(lambda out: _resume_args(toy_root, out, **settings))
    args = _resume_args(toy_root, tmp_path / "split", **settings)
    saved_step, resumed = sigterm_then_resume(monkeypatch, capsys, args, 9)
    assert saved_step == 10  # the step that was running finished
    worst = largest_weight_difference(whole, resumed)
    assert worst == 0.0, worst
    steps = [s for s, _ in scalar_tags(run_dir(resumed))["train/loss"]]
    assert steps == list(range(24)), steps  # 4 epochs x 6 steps, no gap, no duplicate


KILL_AT = Path(__file__).resolve().parent / "kill_at.py"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_subprocess_resumes_without_gaps_or_duplicates(tmp_path, sig):
    """A signal from outside at step 17, inside epoch 1 of 12-step epochs (the launcher waits there
    for it: no timing involved), then a resume in this process."""
    root = make_image_tree(tmp_path / "data", per_class={"train": 12, "validation": 4, "test": 4}, size=48)
    out, marker = tmp_path / "out", tmp_path / "at_step_17"
    args = fast_args(
        root, out, stage="frozen", **{"data.batch_size": "2", "data.image_size": "48", "trainer.max_epochs": "4"}
    )
    env = {k: v for k, v in os.environ.items() if k != "TRANSFER_RUN_DIR"} | {"KILL_AT_MARKER": str(marker)}
    proc = subprocess.Popen(
        [sys.executable, str(KILL_AT), "wait:17", "0", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_file(marker, [proc])
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    (last,) = run_group(out, "frozen", root).glob("*/checkpoints/last.ckpt")
    ckpt = torch.load(last, weights_only=True)  # never truncated
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, err[-2000:]
        assert "resume with ckpt_path=last" in err
        assert ckpt["global_step"] == 18  # the step that was running finished
    else:
        assert proc.returncode == -signal.SIGKILL
        assert ckpt["global_step"] == 12  # the end of epoch 0: SIGKILL loses the current epoch
    stopped_epoch = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
    assert stopped_epoch == 1

    after_event_files(out)
    done = run_train([*args, "ckpt_path=last", f"trainer.max_epochs={stopped_epoch + 2}"])
    assert done["epochs"] == stopped_epoch + 2
    steps = [s for s, _ in scalar_tags(run_dir(done))["train/loss"]]
    assert steps == list(range(12 * (stopped_epoch + 2))), (steps[:5], len(steps))
    assert read_metrics(run_dir(done))["test"]["count"] == 8
