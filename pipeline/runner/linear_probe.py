"""``stage=linear_probe``: a linear head fitted on the cached features with L-BFGS, full batch, to
convergence: a logistic regression (the representation-learning literature's linear probe), with
``optim.weight_decay`` as its L2 strength (choose it on validation: ``sweep.optim.weight_decay=[...]``).

Everything around the fit is the standard stage's: the feature cache, the run folder, the best model
calibrated and evaluated with intervals, the shift report and ``metrics.json`` (``stages.report``);
the fitted head is saved as the run's best (and last) checkpoint, so ``stage=test``, ``predict.py``
and ``finetune.init_ckpt`` (LP-FT) take it like any other. A resumed run fits again (seconds).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig
from torch import nn

from core.errors import ConfigError
from pipeline.runner.build import build_stage
from pipeline.runner.phases import plan_for_run
from pipeline.runner.results import write_config, write_plan
from pipeline.runner.stages import report
from pipeline.runner.trainer_factory import intended_warnings, make_trainer

MAX_ITERATIONS = 1000  # L-BFGS iterations; it stops earlier once the gradient or the loss stops changing


def run_linear_probe(cfg: DictConfig, run_name: str | None) -> dict[str, Any]:
    if cfg.model.head_hidden:
        raise ConfigError("stage=linear_probe fits a linear head: model.head_hidden must be 0")
    started = time.time()
    build = build_stage(cfg, run_name)
    model, data, run = build.model, build.datamodule, build.run
    plan = plan_for_run(cfg, None)
    model.set_plan(plan)
    write_config(cfg, run, plan)
    data.prepare_data()
    data.setup("fit")
    features, labels = data.datasets["train"].tensors
    fit = fit_linear(model, features, labels, cfg.optim.weight_decay)
    rank_zero_info(
        f"linear probe: L-BFGS stopped after {fit['iterations']} iterations, training loss {fit['loss']:.4f} "
        f"(L2 strength {cfg.optim.weight_decay:g})"
    )
    trainer = make_trainer(cfg, run.path, [], model=model, max_epochs=1)
    with intended_warnings():
        trainer.validate(model, datamodule=data, verbose=False)  # attaches the model: its checkpoint can be saved
    best = str(run.checkpoints / "best-linear-probe.ckpt")
    trainer.save_checkpoint(best)
    trainer.save_checkpoint(run.checkpoints / "last.ckpt")
    write_plan(run, plan, trainer)
    return report(cfg, build, trainer, best, started, {"linear_probe": fit})


def fit_linear(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, l2: float) -> dict[str, Any]:
    """Fit the head's (last, only) linear layer by L-BFGS with a strong-Wolfe line search on the
    model's own training loss (class weights and label smoothing included) plus ``l2 * ||W||^2``."""
    linear = [m for m in model.head.classifier if isinstance(m, nn.Linear)][-1]
    optimizer = torch.optim.LBFGS(
        linear.parameters(),
        lr=1.0,
        max_iter=MAX_ITERATIONS,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=50,
        line_search_fn="strong_wolfe",
    )
    pooled = features.float()  # the cache holds the pooled features (B, D): the classifier's input
    model.train()  # the training loss (dropout is skipped: the linear layer is fitted on its own)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model._loss(linear(pooled), labels) + l2 * linear.weight.square().sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    model.eval()
    iterations = int(optimizer.state[linear.weight]["n_iter"])  # L-BFGS keeps its count on the first parameter
    return {"iterations": iterations, "converged": iterations < MAX_ITERATIONS, "loss": float(loss.detach())}
