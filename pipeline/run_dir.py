"""Run folders: ``<out_dir>/<stage>_<backbone>/<YYYYmmdd-HHMMSS>/`` and what goes in them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lightning_modules.backbones import file_safe
from pipeline.config import ConfigError

# Set by the launching process so that DDP workers (which re-run train.py) use the same folder.
RUN_DIR_ENV = "TRANSFER_RUN_DIR"
ALL_RUN_DIR_ENV = "TRANSFER_ALL_RUN_DIR"


def group_dir(cfg: DictConfig, stage: str | None = None) -> Path:
    return Path(cfg.out_dir) / f"{stage or cfg.stage}_{file_safe(cfg.model.backbone)}"


def latest_run_with_checkpoint(cfg: DictConfig) -> Path:
    runs = sorted(p.parent.parent for p in group_dir(cfg).glob("*/checkpoints/last.ckpt"))
    if not runs:
        raise ConfigError(
            f"ckpt_path=last: no run of {cfg.stage}_{cfg.model.backbone} with a last.ckpt under {cfg.out_dir}"
        )
    return runs[-1]


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


def new_run_dir(cfg: DictConfig) -> Path:
    base = group_dir(cfg)
    launch_id = _external_launch_id()
    if launch_id:
        return base / f"job-{launch_id}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = base / stamp, 1
    while candidate.exists():
        candidate, n = base / f"{stamp}-{n}", n + 1
    return candidate


def _inherited_run_dir() -> Path | None:
    """The launching process's run folder, in a DDP worker that Lightning started (LOCAL_RANK > 0).

    Lightning's own launcher sets LOCAL_RANK only in the workers it starts; torchrun and SLURM
    set it in every process, and those get their folder from ``_external_launch_id``."""
    inherited = os.environ.get(RUN_DIR_ENV)
    return Path(inherited) if inherited and os.environ.get("LOCAL_RANK", "0") != "0" else None


def resolve_run(cfg: DictConfig, run_name: str | None = None) -> tuple[Path, str | None]:
    """The run folder and the checkpoint to resume (None for a fresh run). ``run_name`` fixes the
    folder name (stage=all names its three runs after its own folder, identically on every rank)."""
    run_dir = group_dir(cfg) / run_name if run_name else _inherited_run_dir()
    ckpt = cfg.ckpt_path
    if cfg.stage != "test" and ckpt == "last":
        run_dir = run_dir or latest_run_with_checkpoint(cfg)
        ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    elif ckpt is not None:
        if not Path(ckpt).is_file():
            raise ConfigError(f"ckpt_path={ckpt} does not exist")
        parent = Path(ckpt).resolve().parent
        if run_dir is None and cfg.stage != "test" and parent.name == "checkpoints":
            run_dir = parent.parent
    run_dir = run_dir or new_run_dir(cfg)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir, (ckpt if cfg.stage != "test" else None)


def resolve_all_run(cfg: DictConfig) -> Path:
    """stage=all's own folder, set once before any DDP worker starts, so workers inherit it."""
    inherited = os.environ.get(ALL_RUN_DIR_ENV)
    if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
        return Path(inherited)
    run_dir = new_run_dir(cfg)
    os.environ[ALL_RUN_DIR_ENV] = str(run_dir)
    return run_dir


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
