"""Model soups (Wortsman et al., ICML 2022): the weights of fine-tunes that share a start, averaged.

``seeds=[...] soup=uniform|greedy`` around ``stage=finetune finetune.init_ckpt=...``: after the
seeds' runs, ``uniform`` averages them all; ``greedy`` sorts them by validation accuracy and adds
each to the soup only if the soup's validation accuracy does not drop. The soup is evaluated on
validation and test (and shift-reported) like a run, in ``<sweep>/soup-<kind>/``, and saved as a
checkpoint that ``predict.py`` and ``stage=test`` read. Its temperature is 1: a temperature fitted
to one ingredient does not describe the average.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from core.atomic_io import torch_save_atomic
from core.errors import ConfigError, not_a_choice
from pipeline.config.load import load_config
from pipeline.config.schema import SOUPS
from pipeline.registry import takes
from pipeline.robustness.shift_report import report_robustness
from pipeline.robustness.wise import uncalibrated
from pipeline.runner.build import evaluation_data
from pipeline.runner.checkpoints import load_checkpoint, model_from_checkpoint
from pipeline.runner.evaluation import summarise
from pipeline.runner.run_dir import RunFolder
from pipeline.runner.trainer_factory import make_trainer

SOUP_ROW = "result.json"  # the soup's summary row, read back by later commands on the same sweep


def take_soup(argv: list[str]) -> tuple[str | None, list[str]]:
    """``soup=...`` out of a sweep's command line (it is no config key), checked."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("soup=")]
    rest = [a for a in argv if not a.startswith("soup=")]
    if not given:
        return None, rest
    if len(given) > 1 or given[0] not in SOUPS:
        raise not_a_choice("soup", given[-1], SOUPS)
    return given[0], rest


def check_soup(cfg: DictConfig, seeds: list[int] | None, grid: dict[str, list[Any]]) -> None:
    """A soup needs several fine-tunes from one start: refused otherwise, before any run."""
    if not seeds or len(seeds) < 2:
        raise ConfigError("soup= averages the runs of seeds=[...]: give at least two seeds")
    if not takes(cfg, "soup") or not cfg.finetune.init_ckpt:
        raise ConfigError(
            "soup= averages fine-tunes that share a start: use stage=finetune with finetune.init_ckpt=<checkpoint> "
            "(e.g. a frozen run's best), the same for every seed"
        )
    if grid:
        raise ConfigError("soup= averages the seeds of one configuration: drop the sweep.* keys")


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of floating tensors (a tensor equal in every state is copied, so a soup of identical
    runs is that run exactly); integer tensors from the first state."""
    out = {}
    for key, first in states[0].items():
        values = [state[key] for state in states]
        if not first.is_floating_point() or all(torch.equal(first, v) for v in values[1:]):
            out[key] = first.clone()
        else:
            out[key] = torch.stack([v.double() for v in values]).mean(0).to(first.dtype)
    return out


def greedy(
    ingredients: list[tuple[str, float, dict[str, torch.Tensor]]], evaluate: Callable[[dict], float]
) -> tuple[list[str], dict[str, torch.Tensor], float, list[dict[str, Any]]]:
    """Greedy soup: ``(name, val_acc, state)`` sorted by validation accuracy (best first, ties in the
    given order); each next one joins only if ``evaluate`` (validation accuracy) does not drop.
    Also returns each try: the ingredient, the soup's validation accuracy with it, and whether it was
    kept (so a soup of one run says why the others were left out)."""
    order = sorted(ingredients, key=lambda ing: -ing[1])
    kept, soup = [order[0]], order[0][2]
    best = evaluate(soup)
    steps = [{"add": order[0][0], "val_acc": best, "kept": True}]
    for ingredient in order[1:]:
        candidate = average([state for _, _, state in kept] + [ingredient[2]])
        accuracy = evaluate(candidate)
        steps.append({"add": ingredient[0], "val_acc": accuracy, "kept": accuracy >= best})
        if accuracy >= best:
            kept, soup, best = [*kept, ingredient], candidate, accuracy
    return [name for name, _, _ in kept], soup, best, steps


def make_soup(kind: str, base_argv: list[str], rows: list[dict[str, Any]], parent: Path) -> dict[str, Any]:
    """The soup's row for the sweep summary (see the module docstring)."""
    started = time.time()
    folder = parent / f"soup-{kind}"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = load_config([*base_argv, f"out_dir={folder}"])
    ok = [r for r in rows if r["status"] == "ok"]
    if len(ok) < 2:
        raise ConfigError(f"soup={kind}: {len(ok)} finished run(s); a soup needs two")
    checkpoints = [_best_checkpoint(r) for r in ok]
    states = [uncalibrated(load_checkpoint(path)["state_dict"]) for path in checkpoints]
    model = model_from_checkpoint(checkpoints[0])
    data = evaluation_data(cfg, model)
    trainer = make_trainer(cfg, folder, [], devices=1, strategy="auto", enable_checkpointing=False)

    def evaluate(state: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(state)
        return summarise(trainer.validate(model, datamodule=data, verbose=False), "val")["acc"]

    names = [r["cell"] for r in ok]
    steps: list[dict[str, Any]] = []
    if kind == "uniform":
        kept, soup = names, average(states)
    else:
        kept, soup, _, steps = greedy([(n, r["val"]["acc"], s) for n, r, s in zip(names, ok, states)], evaluate)
    model.load_state_dict(soup)
    val = summarise(trainer.validate(model, datamodule=data, verbose=False), "val")
    test = summarise(trainer.test(model, datamodule=data, verbose=False), "test")
    checkpoint = load_checkpoint(checkpoints[0])
    checkpoint["state_dict"] = soup
    path = folder / "soup.ckpt"
    torch_save_atomic(checkpoint, path)
    extra = report_robustness(cfg, trainer, model, data.index.samples["test"], folder, (test or {}).get("acc"))
    metrics = {
        "stage": "soup",
        "soup": kind,
        "ingredients": kept,
        "greedy_steps": steps or None,  # greedy: each ingredient tried, the soup's val acc with it, kept or not
        "backbone": cfg.model.backbone,
        "val": val,
        "test": test,
        "best_ckpt": str(path),
        "run_dir": str(folder),
        "wall_time_s": round(time.time() - started, 2),
        **extra,
    }
    RunFolder(folder).write_json("metrics.json", metrics)
    tried = "; ".join(f"+{t['add']} {t['val_acc']:.4f}{'' if t['kept'] else ' (left out)'}" for t in steps)
    print(
        f"sweep: {kind} soup of {len(kept)} run(s) ({', '.join(kept)}): val acc {val['acc']:.4f}"
        + (f" [greedy: {tried}]" if tried else "")
        + f"; saved {path}"
    )
    row = {
        "cell": f"soup-{kind}",
        "params": {},
        "seed": None,
        "method": f"{kind} soup",
        "status": "ok",
        "val": val,
        "test": test,
        "shift": {"acc": extra["shift"]["shift_acc"]} if "shift" in extra else None,
        "epochs": None,
        "wall_time_s": metrics["wall_time_s"],
        "run_dir": str(folder),
        "ingredients": kept,
    }
    RunFolder(folder).write_json(SOUP_ROW, row)
    return row


def earlier_soups(parent: Path, made: str | None) -> list[dict[str, Any]]:
    """The rows of soups made by an earlier command on this sweep (``soup=greedy``, then ``soup=uniform``):
    the summary keeps every soup made, not only the latest."""
    rows = []
    for kind in SOUPS:
        saved = parent / f"soup-{kind}" / SOUP_ROW
        if kind != made and saved.is_file():
            rows.append(json.loads(saved.read_text()))
    return rows


def _best_checkpoint(row: dict[str, Any]) -> str:
    return json.loads((Path(row["run_dir"]) / "metrics.json").read_text())["best_ckpt"]
