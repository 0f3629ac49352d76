"""A full disk hit by TensorBoard's event writer (its own thread) ends the run with one line, and
``ckpt_path=last`` continues to the uninterrupted result."""

from __future__ import annotations

import errno

import pytest
import torch
from tensorboard.summary.writer.record_writer import RecordWriter

import train

from conftest import finetune_args
from helpers import checkpoint_state, read_metrics, run_dir, run_train


def test_event_writer_on_a_full_disk_is_one_line_and_resumes(toy_root, tmp_path, uninterrupted, monkeypatch, capsys):
    args_for = lambda out: finetune_args(toy_root, out)  # noqa: E731
    want = uninterrupted(args_for)
    writes = {"n": 0}
    original = RecordWriter.write

    def fills_the_disk(self, data):
        writes["n"] += 1
        if writes["n"] > 60:  # well into the run: after the first epoch's checkpoints
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(RecordWriter, "write", fills_the_disk)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as ended:
        train.main(args_for(out))
    err = capsys.readouterr().err
    assert ended.value.code == 2
    assert "Traceback" not in err and "Exception in thread" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "No space left on device (ENOSPC)" in errors[0]
    assert "ckpt_path=last" in errors[0]
    monkeypatch.setattr(RecordWriter, "write", original)

    got = run_train([*args_for(out), "ckpt_path=last"])
    assert read_metrics(run_dir(got))["test"] == read_metrics(run_dir(want))["test"]
    last, want_last = (checkpoint_state(run_dir(m) / "checkpoints" / "last.ckpt") for m in (got, want))
    assert all(torch.equal(last[k], want_last[k]) for k in want_last)
