"""Repeats and sweeps: ``seeds=[1,2,3]`` and ``sweep.<key>=[a,b,...]`` around any stage.

Every cell of the grid (each combination of sweep values, each seed) is one ordinary run,
sequentially, in a parent folder named after the command, so running the same command again
continues an interrupted sweep: finished cells are read back, an interrupted single-stage cell
resumes from its ``last.ckpt``, others start again. ``summary.md``/``summary.json`` give the
per-seed rows, then per cell the mean, standard deviation and 95% interval of the mean; the
TensorBoard HParams view (``<parent>/hparams``) shows the same. A cell that fails is reported in
the summary and the sweep goes on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from core.errors import ConfigError, RunInterrupted, first_line
from pipeline.config.load import cache_dir, flatten_keys, load_config, parse_overrides
from pipeline.config.usage import shown
from pipeline.registry import stage_spec
from pipeline.runner.run_dir import RunFolder, group_dir, is_rank_zero
from pipeline.runner.stages import run_stage
from pipeline.studies.all_stages import check_all, run_all
from pipeline.studies.launch import check_launch, run_cells, take_launch
from pipeline.studies.soup import check_soup, earlier_soups, make_soup, take_soup
from pipeline.studies.statistics import mean_sd_interval
from pipeline.studies.trial import is_pruned, pruning

SUMMARY_METRICS = ("acc", "loss", "f1", "auroc", "ece")
INTERVAL_NOTE = (
    "ci95: 95% Student t interval of the mean over seeds and folds (n-1 degrees of freedom; folds share "
    "training images, so over folds it is optimistic)"
)
# Swept keys that replicate a configuration rather than change it: rows are summarised over them.
REPLICATE_KEYS = ("data.fold",)


def grid_requested(argv: list[str]) -> bool:
    return any(a.startswith(("seeds=", "sweep.", "soup=")) for a in argv)


def parse_grid(argv: list[str]) -> tuple[list[str], list[int] | None, dict[str, list[Any]]]:
    """(the other overrides, the seeds, ``{key: values}`` of the sweep)."""
    grid_args = [a for a in argv if a.startswith(("seeds=", "sweep."))]
    base = [a for a in argv if a not in grid_args]
    parsed = OmegaConf.to_container(parse_overrides(grid_args))
    seeds = parsed.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise ConfigError(f"seeds must be a non-empty list of whole numbers, e.g. seeds=[1,2,3]; got {seeds}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds has repeats: {seeds}")
        if any(a.startswith("seed=") for a in base):
            raise ConfigError("give either seed=N or seeds=[...], not both")
    grid = flatten_keys(parsed.get("sweep", {}))
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.{key} must be a non-empty list of values, e.g. sweep.{key}=[a,b]; got {values}")
        if any(a.startswith(f"{key}=") for a in base):
            raise ConfigError(f"{key} is both swept and set; drop {key}=...")
    if "ckpt_path" in grid or any(a.startswith("ckpt_path=") for a in base):
        raise ConfigError("sweeps and repeats start their own runs; run the same command again to continue one")
    return base, seeds, grid


def cells(base: list[str], seeds: list[int] | None, grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, seeds innermost: ``{"name", "params", "seed", "argv"}``."""
    out = []
    combos = list(itertools.product(*grid.values())) if grid else [()]
    for number, (combo, seed) in enumerate(itertools.product(combos, seeds or [None])):
        params = dict(zip(grid, combo))
        argv = [*base, *(f"{k}={shown(v)}" for k, v in params.items())]
        argv += [f"seed={seed}"] if seed is not None else []
        label = ",".join(f"{k}={shown(v)}" for k, v in params.items()) + (f",seed={seed}" if seed is not None else "")
        out.append({"name": cell_name("cell", number, label.lstrip(",")), "params": params, "seed": seed, "argv": argv})
    return out


def cell_name(kind: str, number: int, label: str) -> str:
    """A study cell's folder name: ``cell003-optim.lr=0.001,seed=1`` (file-safe, at most 120 characters)."""
    return (f"{kind}{number:03d}-" + "".join(c if c.isalnum() or c in "=.,-_" else "_" for c in label))[:120]


def parent_dir(argv: list[str], out_dir: str, stage: str) -> Path:
    """The sweep's folder, named by a digest of the command: the same command finds it again."""
    digest = hashlib.sha1(json.dumps(argv).encode()).hexdigest()[:10]
    return Path(out_dir) / "sweeps" / f"{stage}-{digest}"


def run_grid(argv: list[str]) -> dict[str, Any]:
    soup, argv = take_soup(argv)  # not part of the sweep's name: a soup can follow finished seeds
    launch_args, argv = take_launch(argv)  # nor is the launcher: a study can be continued on another
    base, seeds, grid = parse_grid(argv)
    todo = cells(base, seeds, grid)
    first = load_config([*todo[0]["argv"], *launch_args])
    check_launch(first)
    if soup:
        check_soup(first, seeds, grid)
    parent = parent_dir(argv, first.out_dir, first.stage)
    # the feature cache is shared by every cell (it does not depend on the seed or the head)
    cache = cache_dir(first)
    for cell in todo:  # every cell's configuration is checked before the first one starts
        cell["argv"] += [f"out_dir={parent / cell['name']}", f"data.cache_dir={cache}"]
        cfg = load_config(cell["argv"])
        if stage_spec(cfg.stage).study:
            check_all(cell["argv"], cfg)
        cell["stage"] = cfg.stage
        _CHECKED[cell["name"]] = cfg  # composed once: a cell run in this process runs this config
    # Lightning's DDP workers re-run this command: only global rank zero manages the sweep's files
    # (it deletes a half-started cell, writes results and summaries); the others only train
    manager = is_rank_zero()
    if manager:
        print(f"sweep: {len(todo)} run(s) in {parent} (the same command continues it)")
        RunFolder(parent).write_text("command.txt", "python train.py " + " ".join(argv) + "\n")
    rows = run_cells(first, todo, parent, lambda cell, folder: _run_cell(cell, folder, manager))
    if rows is None:  # submitted to SLURM without waiting: the same command (or launch.wait=true) sums up
        return {"command": argv, "parent": str(parent), "submitted": True}
    if soup and manager:
        rows.append(make_soup(soup, [*base, f"data.cache_dir={cache}"], rows, parent))
    rows += earlier_soups(parent, soup)
    summary = summarise_rows(rows)
    result = {
        "command": argv,
        "seeds": seeds,
        "grid": grid,
        "soup": soup,
        "parent": str(parent),
        "intervals": INTERVAL_NOTE,
        "rows": rows,
        "groups": summary,
    }
    if manager:
        RunFolder(parent).write_json("summary.json", result)
        RunFolder(parent).write_text("summary.md", summary_markdown(argv, rows, summary))
        _log_hparams(parent, rows)
        print(f"sweep: summary in {parent / 'summary.md'}")
    return result


# each cell's checked configuration, by cell name (cells stay plain data: launchers send them as JSON)
_CHECKED: dict[str, DictConfig] = {}


def _run_cell(cell: dict[str, Any], folder: Path, manager: bool = True) -> list[dict[str, Any]]:
    """The cell's result rows (one per method for stage=all); read back if it finished before.
    Only the ``manager`` (global rank zero) deletes or writes the cell's files."""
    done = folder / "result.json"
    if done.is_file():
        print(f"sweep: {cell['name']} finished before; not run again")
        return json.loads(done.read_text())
    argv = list(cell["argv"])
    started = time.time()
    try:
        with pruning(cell):  # a search trial's pruning callback (pipeline/studies/trial.py); else nothing
            rows = _run_rows(cell, argv, folder, manager)
    except RunInterrupted:
        raise  # the user stopped the sweep: the same command continues it
    except Exception as err:  # noqa: BLE001 - a failed cell is reported, the sweep goes on
        message = first_line(err)
        if is_pruned(err):  # the search's pruner stopped it: a finished trial, not a failure to retry
            print(f"search: {cell['name']} pruned: {message}")
            rows = [{**_row(cell, {}, None), "status": "pruned", "error": message}]
            rows[0]["wall_time_s"] = round(time.time() - started, 1)
            if manager:
                RunFolder(folder).write_json(done.name, rows)
            return rows
        print(f"sweep: {cell['name']} failed: {type(err).__name__}: {message}")
        failed = {**_row(cell, {}, None), "status": "failed", "error": f"{type(err).__name__}: {message}"}
        failed["wall_time_s"] = round(time.time() - started, 1)
        return [failed]
    if manager:
        RunFolder(folder).write_json(done.name, rows)
    return rows


def _run_rows(cell: dict[str, Any], argv: list[str], folder: Path, manager: bool) -> list[dict[str, Any]]:
    """Run the cell's stage (or stage=all) and return its rows."""
    if stage_spec(cell["stage"]).study:
        if manager:
            shutil.rmtree(folder, ignore_errors=True)  # stage=all cannot resume: start it again
        outcome = run_all(argv, _CHECKED.get(cell["name"]))
        return [_row(cell, m, m["method"]) for m in outcome["methods"]]
    cfg = _CHECKED.get(cell["name"]) or load_config(argv)  # a launched process composes its own
    last = group_dir(cfg) / "run" / "checkpoints" / "last.ckpt"
    if last.is_file():
        print(f"sweep: {cell['name']} was interrupted; resuming from {last}")
        cfg.ckpt_path = str(last)
    elif manager:
        shutil.rmtree(last.parent.parent, ignore_errors=True)
    return [_row(cell, run_stage(cfg, run_name="run"), None)]


def _row(cell: dict[str, Any], metrics: dict[str, Any], method: str | None) -> dict[str, Any]:
    return {
        "cell": cell["name"],
        "params": cell["params"],
        "seed": cell["seed"],
        "method": method,
        "status": "ok",
        "val": metrics.get("val"),
        "test": metrics.get("test"),
        "shift": {"acc": shift} if (shift := (metrics.get("shift") or {}).get("shift_acc")) is not None else None,
        "epochs": metrics.get("epochs"),
        "wall_time_s": metrics.get("wall_time_s"),
        "run_dir": metrics.get("run_dir"),
    }


def summarise_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration (sweep values and method, over seeds and folds): mean, sd and 95% interval."""

    def config_of(row: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in row["params"].items() if k not in REPLICATE_KEYS}

    def key_of(row: dict[str, Any]) -> str:
        return json.dumps([config_of(row), row["method"]], sort_keys=True)

    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        group = groups.setdefault(key_of(row), {"params": config_of(row), "method": row["method"], "runs": 0})
        group["runs"] += 1
        group["failed"] = group.get("failed", 0) + (row["status"] != "ok")
    for key, group in groups.items():
        ok = [r for r in rows if r["status"] == "ok" and key_of(r) == key]
        for split in ("val", "test", "shift"):
            stats = {}
            for metric in SUMMARY_METRICS:
                values = [r[split][metric] for r in ok if r.get(split) and metric in r[split]]
                if values:
                    stats[metric] = mean_sd_interval(values)
            group[split] = stats
    return list(groups.values())


def _fmt(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "n/a"
    if stats["sd"] is None:
        return f"{stats['mean']:.4f} (1 run)"
    low, high = stats["ci95"]
    return f"{stats['mean']:.4f} ± {stats['sd']:.4f} [{low:.4f}, {high:.4f}]"


def summary_markdown(argv: list[str], rows: list[dict[str, Any]], groups: list[dict[str, Any]]) -> str:
    def label(params: dict, method: str | None) -> str:
        text = ", ".join(f"{k}={shown(v)}" for k, v in params.items()) or "(no sweep)"
        return f"{text} / {method}" if method else text

    lines = [
        "# Sweep summary",
        "",
        "`python train.py " + " ".join(argv) + "`",
        "",
        "## Runs",
        "",
        "| cell | seed | status | val acc | test acc | shift acc | test loss | test ECE | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        val, test = r["val"] or {}, r["test"] or {}
        if r["status"] != "ok":
            lines.append(
                f"| {label(r['params'], r['method'])} | {r['seed']} | {r.get('error', 'failed')} | | | | | | |"
            )
            continue
        lines.append(
            f"| {label(r['params'], r['method'])} | {r['seed']} | ok | {val.get('acc', float('nan')):.4f} "
            f"| {test.get('acc', float('nan')):.4f} | {(r.get('shift') or {}).get('acc', float('nan')):.4f} "
            f"| {test.get('loss', float('nan')):.4f} "
            f"| {test.get('ece', float('nan')):.4f} | {r['wall_time_s']} |"
        )
    lines += [
        "",
        "## Over seeds: mean ± sd [95% interval of the mean]",
        "",
        "| cell | runs (failed) | val acc | test acc | shift acc | test loss | test ECE |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        lines.append(
            f"| {label(g['params'], g['method'])} | {g['runs']} ({g['failed']}) | {_fmt(g['val'].get('acc'))} "
            f"| {_fmt(g['test'].get('acc'))} | {_fmt(g['shift'].get('acc'))} | {_fmt(g['test'].get('loss'))} "
            f"| {_fmt(g['test'].get('ece'))} |"
        )
    lines += [
        "",
        f"{INTERVAL_NOTE}. When two cells' intervals overlap, their difference may be noise: say so, or test it "
        "with a paired test on the same test images (python -m pipeline.studies.compare RUN_A RUN_B).",
        "",
    ]
    return "\n".join(lines)


def _log_hparams(parent: Path, rows: list[dict[str, Any]]) -> None:
    """TensorBoard's HParams view: one entry per finished run (rewritten from scratch each time)."""
    folder = parent / "hparams"
    shutil.rmtree(folder, ignore_errors=True)
    writer = SummaryWriter(str(folder))
    for row in rows:
        if row["status"] != "ok":
            continue
        hparams = {k: shown(v) if isinstance(v, (list, dict)) else v for k, v in row["params"].items()}
        hparams |= {"seed": row["seed"] if row["seed"] is not None else -1, "method": row["method"] or ""}
        metrics = {
            f"hparams/{split}_{m}": row[split][m]
            for split in ("val", "test")
            if row[split]
            for m in SUMMARY_METRICS
            if m in row[split]
        }
        writer.add_hparams(hparams, metrics, run_name=row["cell"] + (f"-{row['method']}" if row["method"] else ""))
    writer.close()
