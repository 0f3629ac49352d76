"""A search trial inside the process that runs its cell (``pipeline/studies/search.py`` asks the trials).

A trial's cell is an ordinary cell (``repeats._run_cell``) that also carries ``cell["trial"]``: the study's
storage, name and the trial's id. With ``search.prune=true`` its Trainers get Optuna's Lightning pruning
callback, which reports the validation accuracy after every epoch to the study's storage and stops the run
(``optuna.TrialPruned``) when the pruner says so. Optuna is imported only when a trial prunes, so cells of
seeds and sweeps never need it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from pipeline.runner.trainer_factory import added_callbacks

MONITOR = "val/acc"  # what the trials are chosen on (pipeline/studies/search.py OBJECTIVE)


@contextlib.contextmanager
def pruning(cell: dict[str, Any]) -> Iterator[None]:
    """Around a trial's run: Optuna's pruning callback on every Trainer (when the search prunes)."""
    spec = cell.get("trial")
    if not spec or not spec.get("prune"):
        yield
        return
    import optuna
    from lightning.pytorch.trainer.states import TrainerFn
    from optuna_integration import PyTorchLightningPruningCallback

    class FitPruning(PyTorchLightningPruningCallback):
        """Optuna's callback, during the fits only: the evaluation of the best checkpoint after training
        also ends in ``on_validation_end``, and must neither report a step nor prune a finished trial."""

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.state.fn == TrainerFn.FITTING:
                super().on_validation_end(trainer, pl_module)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=spec["study"], storage=spec["storage"], pruner=make_pruner(True))
    trial = optuna.trial.Trial(study, spec["id"])  # the trial the driver asked for, by its storage id
    with added_callbacks(lambda: FitPruning(trial, monitor=MONITOR)):
        yield


def make_pruner(prune: bool) -> Any:
    """The search's pruner (the driver's and every trial process's): Optuna's median rule from the 6th
    trial on and from each trial's second epoch on (step 1), or none."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1) if prune else optuna.pruners.NopPruner()


def is_pruned(err: BaseException) -> bool:
    """Optuna's TrialPruned, recognised without importing Optuna."""
    return any(t.__name__ == "TrialPruned" and t.__module__.startswith("optuna") for t in type(err).__mro__)
