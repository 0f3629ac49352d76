"""Optional MLflow tracking (``log.mlflow=true``) beside TensorBoard, through Lightning's MLFlowLogger.

A stage is one MLflow run over all its phases (each phase is its own ``fit`` and Trainer): the
first logger's run id is kept in the run folder (``mlflow_run_id.txt``), and later phases and a
resumed run log into the same MLflow run. ``pip install -e ".[mlflow]"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, MLFlowLogger
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig

from core.errors import ConfigError, first_line
from pipeline.runner.run_dir import RunFolder, is_rank_zero

RUN_ID_FILE = "mlflow_run_id.txt"


def tracking_uri(cfg: DictConfig) -> str:
    """``log.mlflow_uri``, or a local ``<out_dir>/mlruns`` folder."""
    return cfg.log.mlflow_uri or Path(cfg.out_dir).resolve().joinpath("mlruns").as_uri()


def check_available() -> None:
    """``log.mlflow=true`` needs the optional extra; ``pipeline.config.load.validate`` asks before any work."""
    try:
        import mlflow  # noqa: F401 - an optional extra, so imported only when asked for
    except ImportError:
        raise ConfigError("log.mlflow=true needs MLflow: pip install -e '.[mlflow]'") from None


def mlflow_logger(cfg: DictConfig, run_dir: Path) -> Logger:
    """The stage's MLflow logger (MLflow's presence was checked with the config)."""
    uri = tracking_uri(cfg)
    if uri.startswith("file:"):
        # MLflow 3 keeps its folder store in maintenance mode and refuses it unless asked; a local
        # folder needs no server or database (use log.mlflow_uri=sqlite:///... or http://... otherwise)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    id_file = run_dir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    logger = MLFlowLogger(
        experiment_name=run_dir.parent.name,  # <stage>_<backbone>_<data set>, as in TensorBoard
        run_name=run_dir.name,
        tracking_uri=uri,
        run_id=run_id,
        log_model=False,  # the best checkpoint is logged once, at the end (log_results)
    )
    if run_id is None and is_rank_zero():  # other ranks' loggers have no run (Lightning's rank-zero experiment)
        RunFolder(run_dir).write_text(RUN_ID_FILE, logger.run_id + "\n")
    return logger


def log_results(logger: Logger, params: dict[str, Any], metrics: dict[str, float], files: list[Path]) -> None:
    """Final params, metrics and artifacts (best checkpoint, metrics.json, config.yaml); global rank zero."""
    try:
        logger.log_hyperparams(params)
    except Exception as err:  # noqa: BLE001 - MLflow refuses to change a param of a resumed run
        rank_zero_warn(f"MLflow kept the params first logged for this run ({first_line(err, 160)})")
    logger.log_metrics(metrics)
    for path in files:
        if path.is_file():
            folder = "checkpoints" if path.suffix == ".ckpt" else None
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=folder)
