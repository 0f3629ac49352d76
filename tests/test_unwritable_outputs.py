"""Outputs that cannot be written: found before the work where possible, one line always, and
predictions already computed are never lost to the last write."""

from __future__ import annotations

import csv
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import predict
import train

from conftest import fast_args
from toy_data import make_image_tree


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def read_only(tmp_path) -> Iterator[Path]:
    """A real read-only folder: a read-only bind mount (root can write to any folder mode)."""
    source, target = tmp_path / "source", tmp_path / "read_only"
    source.mkdir()
    target.mkdir()
    if not (_mount("--bind", str(source), str(target)) and _mount("-o", "remount,bind,ro", str(target))):
        subprocess.run(["umount", str(target)], capture_output=True)
        pytest.skip("needs root and mount(8) for a read-only bind mount")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)  # also after a failed re-mount


def _photos(tmp_path: Path) -> Path:
    return make_image_tree(tmp_path / "photos", per_class={"train": 0, "validation": 0, "test": 4}, size=32, seed=3)


def _predict(args: list[str], capsys) -> tuple[int, str, str]:
    """predict.py's exit code, standard output and standard error (in this process)."""
    capsys.readouterr()
    try:
        predict.main([*args, "num_workers=0"])
        code = 0
    except SystemExit as ended:
        code = ended.code
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_output_in_a_read_only_folder_is_refused_before_classifying(trained_ckpt, tmp_path, read_only, capsys):
    args = [f"ckpt_path={trained_ckpt}", f"inputs={_photos(tmp_path)}", f"output={read_only}/p.csv"]
    code, out, err = _predict(args, capsys)
    assert code == 2
    assert err.strip().splitlines() == [err.strip()], err  # one line
    assert "Traceback" not in err and "Read-only file system (EROFS)" in err
    assert "classified" not in out  # refused before the work
    assert not list(read_only.iterdir())


def test_predict_output_that_is_a_folder_is_one_line(trained_ckpt, tmp_path, capsys):
    code, _, err = _predict([f"ckpt_path={trained_ckpt}", f"inputs={_photos(tmp_path)}", f"output={tmp_path}"], capsys)
    assert code == 2 and f"output={tmp_path} is a folder; name a file in it" in err


def test_predict_on_an_empty_folder_is_an_error(trained_ckpt, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no pictures here")
    code, _, err = _predict([f"ckpt_path={trained_ckpt}", f"inputs={empty}", f"output={tmp_path / 'p.csv'}"], capsys)
    assert code == 2 and "holds no image files" in err
    assert not (tmp_path / "p.csv").exists()


def test_predictions_survive_an_output_folder_that_fails_at_the_end(
    trained_ckpt, tmp_path, read_only, monkeypatch, capsys
):
    import pipeline.prediction as prediction

    photos = _photos(tmp_path)
    source = read_only.parent / "source"
    classify = prediction.predict_files

    def classify_then_lose_the_folder(*args, **kwargs):
        rows = classify(*args, **kwargs)
        subprocess.run(["umount", str(read_only)], check=True)  # the output folder: writable until now
        subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(read_only)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(read_only)], check=True)
        return rows

    subprocess.run(["umount", str(read_only)], check=True)
    subprocess.run(["mount", "--bind", str(source), str(read_only)], check=True)  # writable for the check
    monkeypatch.setattr(prediction, "predict_files", classify_then_lose_the_folder)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as ended:
        predict.main([f"ckpt_path={trained_ckpt}", f"inputs={photos}", f"output={read_only}/p.csv", "num_workers=0"])
    assert ended.value.code == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the 8 predictions were written to" in err
    (saved,) = tmp_path.glob("predictions-*.csv")
    assert str(saved) in err
    with open(saved) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(r["predicted"] in ("cats", "dogs") for r in rows)


def test_train_out_dir_on_a_read_only_mount_is_refused_up_front(toy_root, read_only, capsys):
    with pytest.raises(SystemExit) as ended:
        train.main(fast_args(toy_root, read_only / "runs", stage="frozen"))
    assert ended.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write in out_dir={read_only / 'runs'}: Read-only file system")
    assert len(err.splitlines()) == 1
