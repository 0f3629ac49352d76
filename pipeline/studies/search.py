"""Search with Optuna: ``search.<key>=<range>`` and ``search.trials=N`` around any training stage.

Ranges: ``log(a,b)`` (a float drawn on a log scale), ``float(a,b)``, ``int(a,b)`` and ``[a,b,...]``
(choices). Optuna's sampler (TPE by default, ``search.sampler=random``) proposes each trial's values
through ask-and-tell, so a trial is an ordinary cell of a study (``pipeline/studies/repeats.py``): its own
run folder, run by any launcher (``launch=serial|local|slurm``; ``launch.parallel`` trials are asked at a
time). The study lives in an SQLite file in the search's folder (``search.storage=`` a database URL, e.g.
PostgreSQL, shares one study between machines that run the same command). Every trial is judged on
validation only: Optuna maximises the validation accuracy of the trial's best epoch, the best trial is the
one with the highest validation accuracy (ties: the lower validation loss, the rule of the runs' own best
checkpoint), and only that trial's test figures are reported, once, with their interval.

Running the same command again continues the search (``search.trials`` may be raised to add trials):
finished trials are read from the study, and a trial the previous driver left running is run again,
resuming its cell's ``last.ckpt``.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from core.errors import ConfigError, first_line
from pipeline.config.load import cache_dir, flatten_keys, load_config, parse_overrides
from pipeline.config.usage import shown
from pipeline.registry import stage_spec
from pipeline.runner.run_dir import RunFolder
from pipeline.studies.launch import check_launch, run_cells, take_launch

CONTROL = {"trials", "storage", "sampler", "prune"}  # search.<these> steer the search; other keys are ranges
SAMPLERS = ("tpe", "random")
_RANGE = re.compile(r"^\s*(log|float|int)\s*\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*\)\s*$")
OBJECTIVE = "validation accuracy of the trial's best epoch (ties: the lower validation loss)"


def search_requested(argv: list[str]) -> bool:
    return any(a.startswith("search.") for a in argv)


def parse_search(argv: list[str]) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """(the other overrides, the control settings, ``{key: range}``), each range as
    ``("log"|"float"|"int", low, high)`` or ``("choice", [values])``; ConfigError for a bad one."""
    mine = [a for a in argv if a.startswith("search.")]
    base = [a for a in argv if a not in mine]
    if any(a.startswith(("seeds=", "sweep.", "soup=")) for a in base):
        raise ConfigError("a search runs its own trials: give either search.<key>=... or seeds/sweep/soup, not both")
    if any(a.startswith("ckpt_path=") for a in base):
        raise ConfigError("a search starts its own runs; run the same command again to continue one")
    flat = flatten_keys(OmegaConf.to_container(parse_overrides(mine))["search"])
    control = {"trials": None, "storage": None, "sampler": "tpe", "prune": False}
    control |= {k: v for k, v in flat.items() if k in CONTROL}
    ranges = {k: parse_range(k, v) for k, v in flat.items() if k not in CONTROL}
    trials = control["trials"]
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ConfigError(f"search.trials must be a whole number of at least 1, e.g. search.trials=20; got {trials}")
    if control["sampler"] not in SAMPLERS:
        raise ConfigError(f"search.sampler={control['sampler']} is not one of: {', '.join(SAMPLERS)}")
    if not isinstance(control["prune"], bool):
        raise ConfigError(f"search.prune must be true or false; got {control['prune']}")
    if not ranges:
        raise ConfigError("a search needs at least one range, e.g. search.optim.lr=log(1e-4,1e-1)")
    for key in ranges:
        if any(a.startswith(f"{key}=") for a in base):
            raise ConfigError(f"{key} is both searched and set; drop {key}=...")
    return base, control, ranges


def parse_range(key: str, value: Any) -> tuple:
    """``log(a,b)``, ``float(a,b)``, ``int(a,b)`` or a list of choices; one-line errors for the rest."""
    hint = f"write e.g. search.{key}=log(1e-4,1e-1), float(0,0.5), int(1,4) or [a,b]"
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"search.{key}=[] has no choices; {hint}")
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in value):
            raise ConfigError(f"search.{key}: choices must be numbers, words or booleans; got {value}")
        if len({json.dumps(v) for v in value}) != len(value):
            raise ConfigError(f"search.{key}={shown(value)} repeats a choice")
        return ("choice", value)
    match = _RANGE.match(str(value))
    if not match:
        raise ConfigError(f"search.{key}={value} is not a range; {hint}")
    kind, low_text, high_text = match.groups()
    try:
        low, high = (int(t) if kind == "int" else float(t) for t in (low_text, high_text))
    except ValueError:
        raise ConfigError(f"search.{key}={value}: the bounds of {kind}(a,b) must be {kind} numbers") from None
    if low > high:
        first = f"{kind}({high_text},{low_text})"
        raise ConfigError(f"search.{key}={value} is reversed: the low bound comes first, {first}")
    if low == high:
        raise ConfigError(f"search.{key}={value} is empty: its bounds are equal (set {key}={low_text} instead)")
    if kind == "log" and low <= 0:
        raise ConfigError(f"search.{key}={value}: log(a,b) needs 0 < a < b")
    return (kind, low, high)


def distribution(spec: tuple) -> Any:
    import optuna.distributions as d

    kind = spec[0]
    if kind == "choice":
        return d.CategoricalDistribution(spec[1])
    if kind == "int":
        return d.IntDistribution(spec[1], spec[2])
    return d.FloatDistribution(spec[1], spec[2], log=kind == "log")


def search_dir(argv: list[str], out_dir: str, stage: str) -> Path:
    """The search's folder and its study's name: a digest of the command without ``search.trials`` (raising
    it adds trials to the same search), the launcher and ``out_dir`` (machines that share a database share
    the study of the same command, wherever each keeps its run folders)."""
    named = [a for a in argv if not a.startswith(("search.trials=", "out_dir="))]
    digest = hashlib.sha1(json.dumps(named).encode()).hexdigest()[:10]
    return Path(out_dir) / "searches" / f"{stage}-{digest}"


def storage_url(storage: str | None, folder: Path) -> str:
    """``search.storage``, or the SQLite file in the search's folder."""
    return storage or f"sqlite:///{(folder / 'optuna.db').resolve()}"


def open_study(url: str, folder: Path, control: dict[str, Any], seed: int) -> Any:
    """The search's Optuna study, created or loaded; a one-line ConfigError when its database cannot be
    opened (a server that is down, a wrong password, a driver that is not installed)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if url.startswith("sqlite:///"):
        folder.mkdir(parents=True, exist_ok=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1) if control["prune"] else None
    try:
        engine = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
        study = optuna.create_study(
            storage=optuna.storages.RDBStorage(url, engine_kwargs=engine),
            study_name=folder.name,
            pruner=pruner or optuna.pruners.NopPruner(),
            direction="maximize",
            load_if_exists=True,
        )
    except Exception as err:  # noqa: BLE001 - sqlalchemy's and the driver's errors, all the user's to fix
        hint = "; pip install -e '.[search]' installs the PostgreSQL driver" if "import" in str(err) else ""
        raise ConfigError(
            f"search.storage={redact(url)}: the study's database cannot be opened: {first_line(err)}{hint}"
        ) from None
    # seeded by the trials already in the study: a continued search does not propose its first trials again
    trial_seed = seed + len(study.trials)
    with warnings.catch_warnings():  # constant_liar is marked experimental; it is what parallel trials need
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.sampler = (
            optuna.samplers.TPESampler(seed=trial_seed, constant_liar=True)
            if control["sampler"] == "tpe"
            else optuna.samplers.RandomSampler(seed=trial_seed)
        )
    return study


def redact(url: str) -> str:
    """A database URL without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def trial_cell(trial: Any, base: list[str], ranges: dict[str, Any], study: dict[str, Any]) -> dict[str, Any]:
    params = {key: trial.params[key] for key in ranges}
    label = ",".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={shown(v)}" for k, v in params.items())
    name = f"trial{trial.number:03d}-" + "".join(c if c.isalnum() or c in "=.,-_" else "_" for c in label)
    return {
        "name": name[:120],
        "params": params,
        "seed": None,
        "argv": [*base, *(f"{k}={shown(v)}" for k, v in params.items())],
        "trial": {**study, "id": trial._trial_id, "number": trial.number},
    }


def run_search(argv: list[str]) -> dict[str, Any]:
    from pipeline.studies import repeats

    launch_args, argv = take_launch(argv)
    base, control, ranges = parse_search(argv)
    first = load_config([*base, *launch_args])
    _check_stage(first, control)
    check_launch(first)
    folder = search_dir(argv, first.out_dir, first.stage)
    url = storage_url(control["storage"], folder)
    study = open_study(url, folder, control, first.seed)
    where = {"study": study.study_name, "storage": url, "prune": control["prune"]}
    # the feature cache is shared by every trial (it depends on neither the head nor the rates)
    base = [*base, f"data.cache_dir={cache_dir(first)}"]
    RunFolder(folder).write_text("command.txt", "python train.py " + " ".join(argv) + "\n")
    print(f"search: {control['trials']} trial(s) of {', '.join(ranges)} in {folder} (the same command continues it)")
    rows_by_trial = _run_trials(study, first, base, ranges, control, folder, where, repeats)
    return _summarise(argv, url, study, rows_by_trial, ranges, control, folder)


def _check_stage(cfg: DictConfig, control: dict[str, Any]) -> None:
    spec = stage_spec(cfg.stage)
    if spec.study or not spec.fits or not spec.reports:
        raise ConfigError(f"search: stage={cfg.stage} does not train and validate one model; search a training stage")
    devices = cfg.trainer.get("devices")
    if control["prune"] and ((isinstance(devices, int) and devices > 1) or int(cfg.trainer.get("num_nodes") or 1) > 1):
        raise ConfigError("search.prune=true prunes single-process trials; drop it for DDP trials (trainer.devices>1)")


def _run_trials(study, first, base, ranges, control, folder, where, repeats) -> dict[int, list]:
    """Ask, run and tell until the study holds ``search.trials`` trials; every trial's rows by number."""
    import optuna

    done: dict[int, list] = {}
    states = optuna.trial.TrialState
    dists = {key: distribution(spec) for key, spec in ranges.items()}
    for trial in study.get_trials(deepcopy=False):
        if trial.state in (states.COMPLETE, states.PRUNED, states.FAIL):
            done[trial.number] = _stored_rows(folder, trial)
    # a trial left running by this search's own driver (the SQLite study is this folder's alone) is run again;
    # in a shared database it may be another machine's
    left = [t for t in study.get_trials(deepcopy=False, states=(states.RUNNING,))]
    own = control["storage"] is None
    if left and not own:
        print(f"search: {len(left)} trial(s) are running elsewhere or were abandoned; not taken over")
    batch_size = (first.launch.parallel or 1) if first.launch.mode != "serial" else 1
    resumed = [optuna.trial.Trial(study, t._trial_id) for t in left] if own else []
    while True:
        todo = resumed or [study.ask(dists) for _ in range(min(batch_size, control["trials"] - len(study.trials)))]
        resumed = []
        if not todo:  # and the trials other machines finished meanwhile (a shared study)
            finished = study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED, states.FAIL))
            return done | {t.number: _stored_rows(folder, t) for t in finished if t.number not in done}
        cells = [trial_cell(t, base, ranges, where) for t in todo]
        for cell in cells:
            cell["argv"] += [f"out_dir={folder / cell['name']}"]
            cfg = load_config(cell["argv"])
            cell["stage"] = cfg.stage
            repeats._CHECKED[cell["name"]] = cfg
        rows = _run_batch(first, cells, folder, repeats)
        for trial, cell in zip(todo, cells):
            trial_rows = [r for r in rows if r["cell"] == cell["name"]]
            _tell(study, trial, trial_rows)
            done[trial.number] = trial_rows
            print(f"search: trial {trial.number} ({len(done)}/{control['trials']} done): {_line(trial_rows[0])}")


def _run_batch(first: DictConfig, cells: list[dict[str, Any]], folder: Path, repeats) -> list[dict[str, Any]]:
    if first.launch.mode == "serial":
        return [row for cell in cells for row in repeats._run_cell(cell, folder / cell["name"])]
    if first.launch.mode == "slurm" and not first.launch.wait:
        print("search: a search waits for each batch of trials (launch.wait=true is implied)")
        first.launch.wait = True
    rows = run_cells(first, cells, folder, repeats._run_cell)
    return rows or []


def _tell(study: Any, trial: Any, rows: list[dict[str, Any]]) -> None:
    import optuna

    row = rows[0]
    states = optuna.trial.TrialState
    if row["status"] == "ok" and (row.get("val") or {}).get("acc") is not None:
        study.tell(trial, row["val"]["acc"])
    else:
        study.tell(trial, state=states.PRUNED if row["status"] == "pruned" else states.FAIL)


def _stored_rows(folder: Path, trial: Any) -> list[dict[str, Any]]:
    """A finished trial's rows from its cell's ``result.json`` (in this folder), else from the study."""
    for path in folder.glob(f"trial{trial.number:03d}-*/result.json"):
        return json.loads(path.read_text())
    status = {"COMPLETE": "ok", "PRUNED": "pruned"}.get(trial.state.name, "failed")
    val = {"acc": trial.value} if trial.value is not None else None
    return [{"cell": f"trial{trial.number:03d}", "params": trial.params, "seed": None, "method": None,
             "status": status, "val": val, "test": None, "shift": None, "epochs": None, "wall_time_s": None,
             "run_dir": None, "note": "run elsewhere (a shared study): its figures are in that machine's folder"}]


def _line(row: dict[str, Any]) -> str:
    val = row.get("val") or {}
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('error', '')}"
    loss = f", val loss {val['loss']:.4f}" if "loss" in val else ""
    return f"val acc {val.get('acc', float('nan')):.4f}{loss}"


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial chosen on validation: the highest accuracy, ties broken by the lower loss."""
    ok = [r for r in rows if r["status"] == "ok" and (r.get("val") or {}).get("acc") is not None]
    return max(ok, key=lambda r: (r["val"]["acc"], -r["val"].get("loss", float("inf"))), default=None)


def _summarise(argv, url, study, rows_by_trial, ranges, control, folder) -> dict[str, Any]:
    from pipeline.studies.repeats import _log_hparams

    numbers = sorted(rows_by_trial)
    rows = [{**rows_by_trial[n][0], "trial": n} for n in numbers]
    best = best_row(rows)
    test = dict(best["test"]) if best and best.get("test") else None
    for row in rows:  # only the chosen trial's test figures are reported: nothing else can be chosen by them
        if row is not best:
            row["test"] = row["shift"] = None
    result = {
        "command": argv,
        "objective": OBJECTIVE,
        "sampler": control["sampler"],
        "prune": control["prune"],
        "storage": redact(url),
        "study": study.study_name,
        "ranges": {k: list(v) for k, v in ranges.items()},
        "parent": str(folder),
        "trials": rows,
        "best": best,
    }
    RunFolder(folder).write_json("summary.json", result)
    RunFolder(folder).write_text("summary.md", summary_markdown(result, test))
    _log_hparams(folder, rows)
    print(f"search: summary in {folder / 'summary.md'}")
    if best:
        print(f"search: best trial {best['trial']} ({_params(best)}): {_line(best)}; {_test_text(test)}")
    return result


def _params(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}={shown(v)}" for k, v in row["params"].items())


def _test_text(test: dict[str, Any] | None) -> str:
    if not test or "acc" not in test:
        return "no test figures (no test split)"
    low, high = test.get("acc_ci95", [float("nan")] * 2)
    count = f" of {test['count']}" if "count" in test else ""
    return f"test acc {100 * test['acc']:.1f}%{count} (95% interval {100 * low:.1f}-{100 * high:.1f}%)"


def summary_markdown(result: dict[str, Any], test: dict[str, Any] | None) -> str:
    lines = [
        "# Search summary",
        "",
        "`python train.py " + " ".join(result["command"]) + "`",
        "",
        f"Sampler: {result['sampler']}; pruning: {'on' if result['prune'] else 'off'}; study "
        f"`{result['study']}` in `{result['storage']}`. Objective: the {OBJECTIVE}.",
        "",
        "## Trials",
        "",
        "| trial | " + " | ".join(result["ranges"]) + " | status | val acc | val loss | epochs | wall time (s) |",
        "|---|" + "---|" * len(result["ranges"]) + "---|---|---|---|---|",
    ]
    for row in result["trials"]:
        val = row.get("val") or {}
        cells = [_fmt(row["params"].get(k)) for k in result["ranges"]]
        status = row["status"] if row["status"] == "ok" else f"{row['status']}: {row.get('error', '')}"
        lines.append(
            f"| {row['trial']} | " + " | ".join(cells) + f" | {status} | {_num(val.get('acc'))} | "
            f"{_num(val.get('loss'))} | {row.get('epochs') or ''} | {row.get('wall_time_s') or ''} |"
        )
    best = result["best"]
    lines += ["", "## Chosen on validation", ""]
    if best is None:
        lines.append("No trial finished with a validation accuracy.")
    else:
        lines += [
            f"Trial {best['trial']}: {_params(best)}; {_line(best)}.",
            "",
            f"Its test figures, reported once: {_test_text(test)}. The other trials' test figures are in their run "
            "folders and are not shown here, so that nothing is chosen by them.",
            "",
            f"Run folder: `{best.get('run_dir')}`",
        ]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else shown(value)


def _num(value: float | None) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""
