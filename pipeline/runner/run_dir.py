"""Run folders: ``<out_dir>/<stage>_<backbone>_<data set>/<YYYYmmdd-HHMMSS>/`` and what goes in them.

The group folder's name (``group_dir``, the one place that builds it) is also the run's name in
TensorBoard, so runs on two data folders (``data.root=photos_300`` and ``data.root=~/data/cats_and_dogs_small``) show
apart. Versions before the data set was in the name used ``<out_dir>/<stage>_<backbone>/``;
``ckpt_path=last`` still finds a run of this data set there.

A folder is created with an exclusive ``mkdir`` the moment it is chosen, so runs launched at the same
instant get distinct folders; ``run.json`` records when it started, the run's identity
(``pipeline/config/identity.py``) and its SLURM job, which is how ``ckpt_path=last`` and a requeued job
find their own run. While a process trains in a folder it holds an ``flock`` on it: a second
process resuming the same run is refused instead of writing over it.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from core.atomic_io import json_text, write_bytes_atomic, write_json_atomic, write_text_atomic
from core.errors import ConfigError, first_line
from core.rank import is_rank_zero
from lightning_modules.choices import file_safe
from pipeline.config.identity import differences
from pipeline.registry import stage_spec

# Set by the launching process so that DDP workers (which re-run train.py) use the same folder.
RUN_DIR_ENV = "TRANSFER_RUN_DIR"
ALL_RUN_DIR_ENV = "TRANSFER_ALL_RUN_DIR"
RUN_RECORD = "run.json"
_claimed: dict[Path, int] = {}  # run folder -> the open descriptor holding its flock


class RunFolder(os.PathLike):
    """One run's folder. Every file the runner writes goes through ``write_*``: atomically (a reader
    or a kill never sees half a file) and on global rank zero only (DDP ranks share the folder), so
    no caller repeats either rule. ``folder / name`` is the path of a file in it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (RunFolder, Path)) and Path(other) == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def write_text(self, name: str, text: str) -> Path:
        if is_rank_zero():
            write_text_atomic(self / name, text)
        return self / name

    def write_json(self, name: str, data: Any) -> Path:
        """Strict JSON (non-finite numbers as null, see ``atomic_io.json_text``)."""
        return self.write_text(name, json_text(data))

    def write_bytes(self, name: str, data: bytes) -> Path:
        if is_rank_zero():
            write_bytes_atomic(self / name, data)
        return self / name


# The data set's name when there is no data folder to name it after.
NO_DATA_NAME = "toy"


def data_set_name(root: str | os.PathLike | None) -> str:
    """The data folder's own name, file-safe: ``data.root=~/data/photos_300/`` -> ``photos_300``.

    The path is made absolute without following links (``data.root=.`` names the current folder, a
    link is named as typed); no folder (``data.root`` unset, or ``/``) is ``toy``."""
    if not root:
        return NO_DATA_NAME
    name = os.path.basename(os.path.abspath(os.path.expanduser(os.fspath(root))))
    return file_safe(name) if name else NO_DATA_NAME


def group_dir(cfg: DictConfig, stage: str | None = None, data_set: bool = True) -> Path:
    """``<out_dir>/<stage>_<backbone>_<data set>``: the folder of a stage's runs, and their name in
    TensorBoard. ``data_set=False``: the folder of older versions (no data set in the name), which
    ``ckpt_path=last`` still reads."""
    name = f"{stage or cfg.stage}_{file_safe(cfg.model.backbone)}"
    if data_set:
        name += f"_{data_set_name(OmegaConf.select(cfg, 'data.root'))}"
    return Path(cfg.out_dir) / name


def read_record(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None


def slurm_job() -> str | None:
    """The SLURM job (array jobs: job_task) this process belongs to, if any."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def _recorded_runs(cfg: DictConfig) -> list[tuple[Path, dict[str, Any]]]:
    """Runs of this stage, backbone and data set that have a record, newest start first; with them
    the runs of an older version's folder (no data set in its name) that recorded this data folder."""
    found = [(p.parent, record) for p in group_dir(cfg).glob(f"*/{RUN_RECORD}") if (record := read_record(p.parent))]
    legacy = group_dir(cfg, data_set=False)
    if legacy.is_dir() and (data_root := OmegaConf.select(cfg, "data.root")):
        root = str(Path(data_root).resolve())
        found += [
            (p.parent, record)
            for p in legacy.glob(f"*/{RUN_RECORD}")
            if (record := read_record(p.parent)) and (record.get("identity") or {}).get("data.root") == root
        ]
    return sorted(found, key=lambda item: item[1].get("started", 0), reverse=True)


def latest_run(cfg: DictConfig, identity: dict[str, Any]) -> Path | None:
    """``ckpt_path=last``: the newest run (by its recorded start) whose identity equals this run's.

    A newer run that was refused before its first checkpoint (``run.json`` ``refused``: a bad
    checkpoint, weights it could not load, a full disk) holds nothing to resume: an older run with a
    checkpoint is taken instead, and the refused one only when no run of this identity has one.
    None when there is no run of this stage, backbone and data set at all (one that failed before its folder
    was made): the caller starts one, as Lightning's ``ckpt_path="last"`` does."""
    runs = _recorded_runs(cfg)
    same = [run_dir for run_dir, record in runs if record.get("identity") == identity]
    usable = [d for d in same if (d / "checkpoints" / "last.ckpt").is_file() or not read_record(d).get("refused")]
    if usable and usable[0] != same[0]:
        passed = same[: same.index(usable[0])]
        print(f"ckpt_path=last: passing over {len(passed)} newer run(s) refused before a checkpoint: {passed[0]}")
    if same:
        return (usable or same)[0]
    if not runs:
        print(f"ckpt_path=last: no run in {group_dir(cfg)} yet; starting one")
        return None
    newest, record = runs[0]
    found = differences(record.get("identity") or {}, identity)
    raise ConfigError(
        f"ckpt_path=last: none of the {len(runs)} run(s) in {group_dir(cfg)} "
        f"used this data and preprocessing; the newest ({newest}) differs in: {'; '.join(found)}"
    )


def _restart_in_place(run_dir: Path) -> None:
    """A run killed before its first checkpoint has nothing to resume: it starts again in its own
    folder, emptied of what the killed process wrote (its record stays)."""
    print(f"ckpt_path=last: {run_dir} was stopped before its first checkpoint; starting it again there")
    if is_rank_zero():
        for path in run_dir.iterdir():
            if path.name != RUN_RECORD:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        record = read_record(run_dir) or {}
        if "refused" in record:  # it runs again: no longer a refused run
            write_json_atomic(run_dir / RUN_RECORD, {k: v for k, v in record.items() if k not in ("refused", "ended")})


def _requeued_run(cfg: DictConfig) -> Path | None:
    """A requeued SLURM job's own run (same job id), which it resumes (or restarts, if it had no checkpoint)."""
    job = slurm_job()
    if not job or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
        return None
    return next((run_dir for run_dir, record in _recorded_runs(cfg) if record.get("slurm_job") == job), None)


def _external_launch_id() -> str | None:
    """A name all ranks agree on when torchrun or SLURM started every process (no shared clock)."""
    external = "TORCHELASTIC_RUN_ID" in os.environ or "SLURM_PROCID" in os.environ
    if not external or int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) < 2:
        return None
    for var in ("TRANSFER_RUN_NAME", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(var)
        if value and value != "none":
            return value
    raise ConfigError("several processes were launched externally: set TRANSFER_RUN_NAME=<name> for all of them")


def new_run_dir(cfg: DictConfig, identity: dict[str, Any] | None = None) -> Path:
    """A new run folder, created exclusively (a concurrent launch takes the next name), with its record."""
    base = group_dir(cfg)
    base.mkdir(parents=True, exist_ok=True)
    launch_id = _external_launch_id()
    if launch_id:  # every rank names the same folder
        run_dir = base / f"job-{launch_id}"
        run_dir.mkdir(exist_ok=True)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in itertools.count():
            run_dir = base / (stamp if n == 0 else f"{stamp}-{n}")
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                continue
    _write_record(run_dir, identity)
    return run_dir


def _write_record(run_dir: Path, identity: dict[str, Any] | None) -> None:
    """``run.json`` of a new run (rank zero; kept as it is when the run resumes)."""
    if is_rank_zero() and not (run_dir / RUN_RECORD).is_file():
        record = {"started": time.time(), "pid": os.getpid(), "identity": identity, "slurm_job": slurm_job()}
        write_json_atomic(run_dir / RUN_RECORD, record)


def claim(run_dir: Path) -> None:
    """Hold an exclusive ``flock`` on ``run_dir`` until ``release``; another process holding it is an
    error (rank zero only: DDP workers share their launcher's folder)."""
    run_dir = run_dir.resolve()
    if not is_rank_zero() or run_dir in _claimed:
        return
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"run folder {run_dir} is in use by another process; wait for it to finish, or start a new run"
        ) from None
    _claimed[run_dir] = fd


def note_refusal(err: BaseException) -> None:
    """Record in ``run.json`` of every folder this process holds that the run ended with ``err``
    before its first checkpoint, so ``ckpt_path=last`` does not take it for the run to resume."""
    for run_dir in _claimed:
        record = read_record(run_dir)
        if record is None or (run_dir / "checkpoints" / "last.ckpt").is_file():
            continue
        with contextlib.suppress(OSError):  # a full disk must not hide the error being recorded
            write_json_atomic(run_dir / RUN_RECORD, record | {"refused": first_line(err), "ended": time.time()})


def release_all() -> None:
    for fd in _claimed.values():
        os.close(fd)  # closing the descriptor releases its flock
    _claimed.clear()


def _inherited_run_dir() -> Path | None:
    """The launching process's run folder, in a DDP worker that Lightning started (LOCAL_RANK > 0).

    Lightning's own launcher sets LOCAL_RANK only in the workers it starts; torchrun and SLURM
    set it in every process, and those get their folder from ``_external_launch_id``."""
    inherited = os.environ.get(RUN_DIR_ENV)
    return Path(inherited) if inherited and os.environ.get("LOCAL_RANK", "0") != "0" else None


def resolve_run(
    cfg: DictConfig, run_name: str | None = None, identity: dict[str, Any] | None = None
) -> tuple[RunFolder, str | None]:
    """The run folder and the checkpoint to resume (None for a fresh run). ``run_name`` fixes the
    folder name (stage=all and sweeps name their runs, identically on every rank)."""
    run_dir = group_dir(cfg) / run_name if run_name else _inherited_run_dir()
    ckpt = cfg.ckpt_path
    training = stage_spec(cfg.stage).fits
    if training and ckpt is None and run_dir is None and (requeued := _requeued_run(cfg)) is not None:
        print(f"SLURM requeue of job {slurm_job()}: resuming its own run {requeued}")
        run_dir, ckpt = requeued, "last"
    restart = False
    if training and ckpt == "last":
        run_dir = run_dir or latest_run(cfg, identity or {})
        ckpt = str(run_dir / "checkpoints" / "last.ckpt") if run_dir else None
        if run_dir and not Path(ckpt).is_file():
            ckpt, restart = None, True
    elif ckpt is not None:
        if not Path(ckpt).is_file():
            raise ConfigError(f"ckpt_path={ckpt} does not exist")
        parent = Path(ckpt).resolve().parent
        if run_dir is None and training and parent.name == "checkpoints":
            run_dir = parent.parent
    if run_dir is None:
        run_dir = new_run_dir(cfg, identity)
    elif not run_dir.is_dir():  # a named run (stage=all, sweeps) starting afresh
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_record(run_dir, identity)
    claim(run_dir)
    if restart:
        _restart_in_place(run_dir)
    _hand_off(RUN_DIR_ENV, run_dir)
    return RunFolder(run_dir), (ckpt if training else None)


def resolve_all_run(cfg: DictConfig) -> RunFolder:
    """stage=all's own folder, set once before any DDP worker starts, so workers inherit it."""
    inherited = os.environ.get(ALL_RUN_DIR_ENV)
    if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
        return RunFolder(inherited)
    run_dir = new_run_dir(cfg)
    _hand_off(ALL_RUN_DIR_ENV, run_dir)
    return RunFolder(run_dir)


def _hand_off(variable: str, run_dir: Path) -> None:
    """The launcher hand-off, the only environment this project writes: Lightning's DDP launcher
    starts its workers with a copy of this process's environment, and they re-run train.py."""
    os.environ[variable] = str(run_dir)
