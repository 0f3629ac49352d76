"""Faults injected into a running process with libfiu (Debian's ``fiu-utils``), the way SQLite is
tested: a two-phase toy fine-tune is started under ``fiu-run -x``, paused at a named point
(``kill_at.py`` with ``$KILL_AT_PAUSE``), and from that moment ``fiu-ctrl`` makes its writes fail
with ENOSPC or EIO, or its opens with EIO, for a while. Every trial must end finished, or with exit
2 or 3 and one ``error:`` line (no traceback); resumed with ``ckpt_path=last`` and no faults, it must
end with the uninterrupted run's weights and ``metrics.json``, and leave no temporary file, no
unreadable checkpoint and no second run folder.

``fiu-run -x`` preloads libfiu's POSIX wrappers; switching them on at start-up would break the
interpreter's own start (its imports), hence the pause. The wrappers are ``tests/fiu_posix_io.c``,
compiled here and given to ``fiu-run -l`` in place of Debian's, which abort a process that loads
torch's CUDA libraries (see that file).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_kill_anywhere import KILL_AT, _outcome

from conftest import finetune_args
from helpers import run_group
from toy_data import make_image_tree

LIBFIU = Path("/usr/lib/libfiu.so.0")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("fiu-run") is None or not LIBFIU.exists() or shutil.which("gcc") is None,
        reason="needs libfiu (apt-get install fiu-utils) and gcc",
    ),
]

ENOSPC, EIO = 28, 5
WRITE, OPEN = "posix/io/rw/write", "posix/io/oc/open"
# (point, fault, errno, probability, seconds the fault stays on after the pause)
TRIALS = [
    ("scan", WRITE, ENOSPC, 1.0, 0.5),  # the scan memory, the manifest
    ("cache", WRITE, ENOSPC, 1.0, 0.5),  # the decoded-image cache
    ("step:2", WRITE, ENOSPC, 0.5, 1.5),  # inside the head phase: TensorBoard, then the epoch's checkpoints
    ("val:0", WRITE, ENOSPC, 1.0, 1.0),  # during the first validation
    ("writing:2", WRITE, ENOSPC, 1.0, 0.5),  # a checkpoint write
    ("saved:3", WRITE, ENOSPC, 1.0, 1.0),  # right after the phase hand-over
    ("tensorboard:2", WRITE, ENOSPC, 1.0, 0.5),  # TensorBoard's flush of its event file
    ("writing:5", WRITE, ENOSPC, 0.3, 1.0),  # a checkpoint write in the second phase, some writes pass
    ("test", WRITE, ENOSPC, 1.0, 1.0),  # the final evaluation
    ("temperature", WRITE, ENOSPC, 1.0, 0.5),  # the temperature stored in the best checkpoint
    ("metrics", WRITE, ENOSPC, 1.0, 0.5),  # metrics.json and the result files
    ("step:9", WRITE, EIO, 0.5, 1.5),  # inside the second phase
    ("val:2", WRITE, EIO, 1.0, 1.0),
    ("tensorboard:3", WRITE, EIO, 1.0, 0.5),
    ("temperature", WRITE, EIO, 1.0, 0.5),
    ("scan", OPEN, EIO, 1.0, 0.3),  # opens of the images themselves: the scan must not remember them as bad
    ("writing:2", OPEN, EIO, 1.0, 0.5),
    ("saved:3", OPEN, EIO, 1.0, 1.0),
    ("test", OPEN, EIO, 1.0, 1.0),
    ("metrics", OPEN, EIO, 1.0, 0.5),
]


READ = "posix/io/rw/read"
# EIO on reads while training reads its images from their files (no decoded cache), from the first
# step named to the second: (first, until, probability)
READ_TRIALS = [(2, 4, 0.3), (9, 11, 0.6), (13, 15, 0.5)]


def _ids(trial) -> str:
    point, fault, code, p, _ = trial
    return f"{point}-{fault.split('/')[-1]}-{'ENOSPC' if code == ENOSPC else 'EIO'}-p{p}"


def _args(root: Path, out: Path) -> list[str]:
    # the decoded cache: images are read from one memory-mapped file in training, so faults hit
    # the run's own files; data.cache_dir inside out_dir: each trial builds (and may break) its own
    return finetune_args(root, out, **{"data.decoded_cache": "true", "data.cache_dir": str(out / "cache")})


def _fiu_run(fiu_lib: Path, fifo: Path) -> tuple[str, ...]:
    return ("fiu-run", "-x", "-l", str(fiu_lib), "-f", str(fifo))


def _wait_for(proc: subprocess.Popen, marker: Path) -> bool:
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    return marker.exists()


def _pause_and_inject(
    proc, pause: Path, fifo: Path, fault: str, code: int, probability: float, seconds: float = 0, until: Path = None
) -> str:
    """Wait for ``proc`` to reach its pause point, switch ``fault`` on, release it, switch the fault
    off ``seconds`` later or when it pauses at ``until`` (or when it ends); returns its stderr."""
    assert _wait_for(proc, pause), f"the pause point was never reached: {proc.communicate()[1][-3000:]}"
    pid = int(pause.read_text())
    _ctrl(fifo, pid, f"enable_random name={fault},probability={probability},failinfo={code}")
    Path(f"{pause}.go").touch()
    if until is not None:
        _wait_for(proc, until)
    else:
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pass
    _ctrl(fifo, pid, f"disable name={fault}")
    if until is not None:
        Path(f"{until}.go").touch()
    return proc.communicate(timeout=600)[1]


def _run(args: list[str], cwd: Path, env: dict | None = None, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    env = {k: v for k, v in (env or os.environ).items() if k != "TRANSFER_RUN_DIR"}
    return subprocess.Popen(
        [*prefix, sys.executable, str(KILL_AT), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


@pytest.fixture(scope="module")
def fiu_lib(tmp_path_factory) -> Path:
    """A folder for ``fiu-run -l``: its run preload, and the I/O wrappers built from tests/fiu_posix_io.c."""
    folder = tmp_path_factory.mktemp("fiu-lib")
    source = Path(__file__).with_name("fiu_posix_io.c")
    library = folder / "fiu_posix_preload.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl", str(LIBFIU)], check=True)
    (folder / "fiu_run_preload.so").symlink_to(LIBFIU.parent / "fiu" / "fiu_run_preload.so")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("fiu")
    root = make_image_tree(base / "toy")
    proc = _run(["none", "0", *_args(root, base / "whole")], base)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return {"root": root, "outcome": _outcome(base / "whole", root)}


def _ctrl(fifo: Path, pid: int, command: str) -> None:
    subprocess.run(["fiu-ctrl", "-f", str(fifo), "-c", command, str(pid)], capture_output=True, timeout=30)


def _record(trial, returncode: int, stderr: str, **more) -> None:
    """With ``$FAULT_REPORT`` set, one JSON line per trial (for the closing table of a run of this file)."""
    if os.environ.get("FAULT_REPORT"):
        line = next((x for x in stderr.splitlines() if x.startswith("error: ")), "")
        row = {"trial": list(trial), "exit": returncode, "line": line, "traceback": "Traceback" in stderr, **more}
        with open(os.environ["FAULT_REPORT"], "a") as report:
            report.write(json.dumps(row) + "\n")


def _assert_one_line_or_finished(returncode: int, stderr: str, trial) -> None:
    assert "Traceback" not in stderr, (trial, stderr[-3000:])
    assert returncode in (0, 2, 3), (trial, returncode, stderr[-3000:])
    if returncode:
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, (trial, stderr[-3000:])


@pytest.mark.parametrize("trial", TRIALS, ids=[_ids(t) for t in TRIALS])
def test_fault_anywhere_ends_in_one_line_and_resumes_to_the_same_result(fiu_lib, reference, tmp_path, trial):
    point, fault, code, probability, seconds = trial
    out, pause, fifo = tmp_path / "out", tmp_path / "pause", tmp_path / "fiu-ctrl"
    args = _args(reference["root"], out)
    env = os.environ | {"KILL_AT_PAUSE": str(pause)}
    proc = _run([point, "0", *args], tmp_path, env, prefix=_fiu_run(fiu_lib, fifo))
    stderr = _pause_and_inject(proc, pause, fifo, fault, code, probability, seconds)
    _assert_one_line_or_finished(proc.returncode, stderr, trial)

    resumed = _run(["none", "0", *args, "ckpt_path=last"], tmp_path)
    _, resume_err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, (trial, proc.returncode, stderr[-2000:], resume_err[-3000:])
    assert len([p for p in run_group(out, "finetune", reference["root"]).iterdir() if p.is_dir()]) == 1
    assert not [p for p in out.rglob("*.tmp")], "a temporary file was left"
    for ckpt in out.rglob("*.ckpt"):
        torch.load(ckpt, map_location="cpu", weights_only=True)  # every checkpoint left is readable
    metrics, best, last = _outcome(out, reference["root"])
    want_metrics, want_best, want_last = reference["outcome"]
    assert metrics == want_metrics, trial
    for got, want in ((best, want_best), (last, want_last)):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), trial
    _record(trial, proc.returncode, stderr, identical=True)


@pytest.mark.parametrize("first, until, probability", READ_TRIALS)
def test_image_read_errors_in_training_are_listed_skips(fiu_lib, reference, tmp_path, first, until, probability):
    out, pause, fifo = tmp_path / "out", tmp_path / "pause", tmp_path / "fiu-ctrl"
    args = finetune_args(reference["root"], out)
    env = os.environ | {"KILL_AT_PAUSE": str(pause), "KILL_AT_UNTIL": str(until)}
    proc = _run([f"step:{first}", "0", *args], tmp_path, env, prefix=_fiu_run(fiu_lib, fifo))
    stderr = _pause_and_inject(proc, pause, fifo, READ, EIO, probability, until=Path(f"{pause}.until"))
    _assert_one_line_or_finished(proc.returncode, stderr, (first, until, probability))
    if proc.returncode:  # every image of a batch failed (possible at these rates): stopped with one line
        assert "every image of a training batch" in stderr
        resumed = _run(["none", "0", *args, "ckpt_path=last"], tmp_path)
        _, stderr = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, stderr[-3000:]
    (folder,) = [p for p in run_group(out, "finetune", reference["root"]).iterdir() if p.is_dir()]
    rows = [r.split("\t") for r in (folder / "skipped_files.tsv").read_text().splitlines()[1:]]
    skipped = [path for split, path, reason in rows if reason.endswith("(during training)")]
    assert skipped and all(split == "train" for split, _, _ in rows), rows
    assert all(Path(p).is_file() for p in skipped)  # real images, readable again now
    assert json.loads((folder / "metrics.json").read_text())["skipped_in_training"] == len(skipped)
    assert "unreadable during training were left out" in stderr
    _record(("read", first, until, probability), proc.returncode, stderr, skipped=len(skipped))
