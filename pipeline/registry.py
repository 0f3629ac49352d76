"""The stages: one ``StageSpec`` each, the only place that says what a stage is and does.

``--help``, the schema's ``stage`` choices, the configuration checks, the runner's dispatch, the
studies (``stage=all``, seeds, soups) and the plan read a stage's spec; nothing else compares stage
names. A new stage is its spec here, its preset (``configs/stage/<name>.yaml``) and, if the standard
walk (build -> plan -> phases -> evaluate -> report) does not fit, its runner. Runners and callbacks
are named as ``"module:attribute"`` and imported on use, so this module (and ``--help``) needs
neither torch nor Lightning.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# What a stage may take besides the common keys (checked against the config, read by the runner):
OPTIONS = {
    "init_ckpt": "finetune.init_ckpt: start from another run's checkpoint (LP-FT from a features/frozen run)",
    "l2sp": "finetune.l2sp: pull the trained backbone towards its starting weights",
    "wise": "finetune.wise: WiSE-FT, the fine-tuned weights mixed with the head-only phase's",
    "blocks": "finetune.blocks / unfreeze_blocks / milestones: which backbone blocks train, and when",
    "soup": "soup=uniform|greedy over seeds=[...] that share finetune.init_ckpt",
    "lora": "finetune.method=lora: low-rank adapters train in the plan's blocks instead of their weights",
    "shifts": "eval.shifts: the shift report on the test split",
}


@dataclass(frozen=True)
class StageSpec:
    name: str
    help: str  # one line for --help
    trains: str  # what it trains, in words
    runner: str = "pipeline.runner.stages:train"  # called as runner(cfg, run_name) -> metrics
    inputs: str = "images"  # "images", or "features": the frozen backbone's outputs, cached once
    unfreezes: bool = False  # the backbone's blocks train in later phases (the plan has milestones)
    options: frozenset[str] = frozenset()  # of OPTIONS
    fits: bool = True  # makes (or resumes) its own run folder and trains; False: evaluates a checkpoint
    plan: bool = True  # has a training plan (phases, learning rates)
    needs_checkpoint: bool = False  # ckpt_path= is required
    study: bool = False  # runs other stages (stage=all): runner(argv, cfg) -> metrics
    reports: bool = True  # ends with validation and test figures (lr_find: a suggested learning rate)

    def load(self, what: str) -> Callable[..., Any]:
        module, _, attribute = what.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def run(self, *args: Any) -> dict[str, Any]:
        return self.load(self.runner)(*args)

    def takes(self, option: str) -> bool:
        return option in self.options


_TRAINING = frozenset({"shifts"})
SPECS: tuple[StageSpec, ...] = (
    StageSpec(
        "features",
        "seed method 1: frozen backbone run once, features cached, head trained on them",
        "the head, on cached features",
        inputs="features",
        options=_TRAINING,
    ),
    StageSpec(
        "frozen",
        "seed method 2: frozen backbone + augmentation, trained end to end",
        "the head, on augmented images through the frozen backbone",
        options=_TRAINING,
    ),
    StageSpec(
        "finetune",
        "seed method 3: head warm-up, then the top blocks unfrozen at a lower learning rate",
        "the head, then the chosen backbone blocks",
        unfreezes=True,
        options=_TRAINING | {"init_ckpt", "l2sp", "wise", "blocks", "soup", "lora"},
    ),
    StageSpec(
        "linear_probe",
        "a linear head fitted on the cached features with L-BFGS (full batch): the strong baseline",
        "a linear head (logistic regression), on cached features",
        runner="pipeline.runner.linear_probe:run_linear_probe",
        inputs="features",
        options=_TRAINING,
    ),
    StageSpec(
        "test",
        "evaluate ckpt_path=... on the test split",
        "nothing",
        runner="pipeline.runner.test_stage:run_test",
        fits=False,
        plan=False,
        needs_checkpoint=True,
        options=frozenset({"shifts"}),
    ),
    StageSpec(
        "all",
        "features, frozen, then finetune from the best frozen checkpoint; a comparison table",
        "the three seed methods in turn",
        runner="pipeline.studies.all_stages:run_all",
        study=True,
        plan=False,
    ),
    StageSpec(
        "lr_find",
        "learning-rate range test on the head phase (backbone frozen): plot and suggested optim.lr",
        "the head, for one epoch at rising learning rates",
        runner="pipeline.runner.lr_find:run_lr_find_stage",
        reports=False,
    ),
)
STAGES: dict[str, StageSpec] = {spec.name: spec for spec in SPECS}
STAGE_NAMES = tuple(STAGES)
STAGE_HELP = {spec.name: spec.help for spec in SPECS}
# the stages a study (stage=all, seeds, sweeps) can repeat or compare: they train and report a result
TRAINING_STAGES = tuple(s.name for s in SPECS if s.fits and s.plan and s.reports and not s.study)


def stage_spec(name: str) -> StageSpec:
    """The spec of stage ``name`` (the schema has already refused unknown names)."""
    return STAGES[name]


def takes(cfg: Any, option: str) -> bool:
    """Whether ``cfg.stage`` takes ``option`` (one of OPTIONS)."""
    return stage_spec(cfg.stage).takes(option)
