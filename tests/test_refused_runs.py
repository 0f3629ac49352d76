"""A run refused before its first checkpoint never becomes the run that ``ckpt_path=last`` resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import train

from conftest import fast_args
from helpers import run_dir, run_group, run_train


def _truncated_copy(ckpt: Path, folder: Path) -> Path:
    folder.mkdir()
    copy = folder / "copy.ckpt"
    data = ckpt.read_bytes()
    copy.write_bytes(data[: len(data) // 2])
    return copy


def test_refused_resume_does_not_capture_ckpt_path_last(toy_root, tmp_path, capsys):
    args = fast_args(toy_root, tmp_path / "out", stage="frozen", **{"trainer.max_epochs": "1"})
    first = run_dir(run_train(args))
    bad = _truncated_copy(first / "checkpoints" / "last.ckpt", tmp_path / "elsewhere")
    with pytest.raises(SystemExit) as refused:  # a new folder is made, then the checkpoint is refused
        train.main([*args, f"ckpt_path={bad}"])
    assert refused.value.code == 2
    folders = sorted(p for p in run_group(tmp_path / "out", "frozen", toy_root).iterdir() if p.is_dir())
    (left,) = [p for p in folders if p != first]
    assert json.loads((left / "run.json").read_text())["refused"]
    capsys.readouterr()

    resumed = run_train([*args, "trainer.max_epochs=2", "ckpt_path=last"])
    out = capsys.readouterr().out
    assert run_dir(resumed) == first, out  # the real run continued, not the refused one restarted
    assert resumed["epochs"] == 2
    assert "passing over 1 newer run(s) refused before a checkpoint" in out
    assert "starting it again" not in out


def test_a_refused_run_alone_is_restarted_in_its_folder(toy_root, tmp_path, capsys):
    args = fast_args(toy_root, tmp_path / "out", stage="frozen", **{"trainer.max_epochs": "1"})
    missing = tmp_path / "gone.pth"
    with pytest.raises(SystemExit):
        train.main([*[a for a in args if not a.startswith("model.weights=")], f"model.weights={missing}"])
    (left,) = run_group(tmp_path / "out", "frozen", toy_root).iterdir()
    if not (left / "run.json").is_file():
        shutil.rmtree(left)
        pytest.skip("model.weights is checked before the run folder exists")
    assert json.loads((left / "run.json").read_text())["refused"]
    resumed = run_train([*args, "ckpt_path=last"])
    assert run_dir(resumed) == left
    assert "refused" not in json.loads((left / "run.json").read_text())
