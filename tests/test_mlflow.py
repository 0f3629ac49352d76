"""log.mlflow=true: one MLflow run per stage (all phases), read back with mlflow.search_runs."""

from __future__ import annotations

import sys

import pytest

from conftest import BACKBONE, fast_args
from helpers import run_train


def test_a_two_phase_run_is_one_mlflow_run_with_metrics_and_checkpoint(toy_root, tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="pip install -e '.[mlflow]'")
    uri = (tmp_path / "mlruns").as_uri()
    metrics = run_train(
        fast_args(
            toy_root,
            tmp_path,
            stage="finetune",
            **{"finetune.unfreeze_blocks": "1", "log.mlflow": "true", "log.mlflow_uri": uri},
        )
    )
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[f"finetune_{BACKBONE}_{toy_root.name}"], output_format="list")
    assert len(runs) == 1  # both phases' fits logged into the same run
    run = runs[0]
    assert run.data.params["optim.name"] == "adam" and run.data.params["finetune.warmup_epochs"] == "1"
    assert run.data.metrics["hparams/test_acc"] == pytest.approx(metrics["test"]["acc"])
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "val/acc")
    assert len(history) >= 3  # one per epoch of both phases, plus the final evaluation
    artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"metrics.json", "config.yaml", "checkpoints"} <= artifacts
    checkpoints = mlflow.tracking.MlflowClient().list_artifacts(run.info.run_id, "checkpoints")
    assert [a.path.split("/")[-1] for a in checkpoints] == [metrics["best_ckpt"].split("/")[-1]]


def test_without_mlflow_installed_the_error_is_one_line(toy_root, tmp_path, monkeypatch, capsys):
    import train

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with pytest.raises(SystemExit):
        train.main(fast_args(toy_root, tmp_path, stage="frozen", **{"log.mlflow": "true"}))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: log.mlflow=true needs MLflow: pip install -e '.[mlflow]'"]
