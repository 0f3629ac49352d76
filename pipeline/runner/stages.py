"""Run one stage end to end, top to bottom: build -> plan -> run the phases -> evaluate -> report.

Each step lives in its own module: ``pipeline/runner/build.py`` (data, run folder, model),
``pipeline/runner/phases.py`` (the plan's fits), ``pipeline/runner/evaluation.py`` and ``pipeline/robustness/wise.py``
(the best model, calibrated and tested), ``pipeline/robustness/shift_report.py`` (robustness) and
``pipeline/runner/results.py`` (what the run folder keeps). Which runner a stage uses is its spec's
(``pipeline/registry.py``): ``train`` here for most, ``pipeline/runner/test_stage.py`` for ``stage=test``.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from datamodules.feature_cache import FeatureDataModule
from lightning_modules.best_checkpoint import best_epoch
from pipeline.registry import stage_spec, takes
from pipeline.robustness.shift_report import report_robustness, shift_accuracy
from pipeline.robustness.wise import run_wise
from pipeline.runner.build import Build, build_stage, report_training_skips
from pipeline.runner.evaluation import best_checkpoint, evaluate_best, summarise
from pipeline.runner.phases import plan_for_run, run_phases
from pipeline.runner.results import record_predictions, speed_report, write_config, write_plan, write_results
from pipeline.runner.run_dir import note_refusal, release_all


def run_stage(cfg: DictConfig, run_name: str | None = None) -> dict[str, Any]:
    """Run ``cfg.stage`` (its runner in ``pipeline.registry``); returns (and writes to the run
    folder) the metrics."""
    try:
        seed_everything(cfg.seed, workers=True)
        return stage_spec(cfg.stage).run(cfg, run_name)
    except Exception as err:
        note_refusal(err)  # so that ckpt_path=last does not pick a folder that holds nothing
        raise
    finally:
        release_all()  # the run folder's lock (pipeline/runner/run_dir.py)


def train(cfg: DictConfig, run_name: str | None) -> dict[str, Any]:
    """The standard walk of a training stage: build, plan, one fit per phase, then ``report``."""
    started = time.time()
    build = build_stage(cfg, run_name)
    plan = plan_for_run(cfg, build.resume_ckpt)
    rank_zero_info(plan.describe())
    write_config(cfg, build.run, plan)
    write_plan(build.run, plan)
    done = run_phases(cfg, build, plan)
    if done.plan != plan:  # a phase stopped early: config.yaml shows the plan as executed
        write_config(cfg, build.run, done.plan)
    write_plan(build.run, done.plan, done.trainer)
    extra = {"phases": done.phases} | speed_report(done.timer)
    return report(cfg, build, done.trainer, best_checkpoint(done.trainer), started, extra)


def report(
    cfg: DictConfig, build: Build, trainer: Trainer, best: str | None, started: float, extra: dict[str, Any]
) -> dict[str, Any]:
    """After training: the best model (WiSE-FT's choice, where the stage takes it) calibrated and
    evaluated, its test predictions, the shift report, and ``metrics.json``."""
    model, run = build.model, build.run
    extra = build.extra | extra
    test_samples = build.images.index.samples["test"]
    if takes(cfg, "wise") and cfg.finetune.wise:
        shift_acc = partial(shift_accuracy, cfg, trainer, samples=test_samples)
        best, extra["wise"] = run_wise(cfg, trainer, model, build.datamodule, run.path, best, summarise, shift_acc)
    result = evaluate_best(trainer, model, build.datamodule, run.path, cfg.eval.temperature, best)
    extra |= record_predictions(trainer, run, model, [path for path, _ in test_samples], result)
    extra |= report_robustness(cfg, trainer, model, test_samples, run, (result.test or {}).get("acc"))
    if isinstance(build.datamodule, FeatureDataModule):
        extra["feature_cache"] = {"path": str(build.datamodule.path), "built": build.datamodule.computed}
    extra |= report_training_skips(run)
    extra |= {"best_ckpt": result.best, "best_epoch": best_epoch(result.best), "calibration": result.calibration}
    return write_results(cfg, run, trainer, model, started, result.val, result.test, extra)
