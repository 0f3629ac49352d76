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
import os
import re
import socket
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from core.errors import ConfigError, first_line
from pipeline.config.load import cache_dir, flatten_keys, load_config, parse_overrides
from pipeline.config.usage import shown
from pipeline.registry import stage_spec
from pipeline.runner.run_dir import RunFolder
from pipeline.runner.trainer_factory import expected_world_size, on_gpu
from pipeline.studies import launch
from pipeline.studies.launch import check_launch, run_cells, take_launch
from pipeline.studies.trial import make_pruner

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
    the study of the same command, wherever each keeps its run folders, whatever their database login)."""
    named = [a for a in argv if not a.startswith(("search.trials=", "search.storage=", "out_dir="))]
    digest = hashlib.sha1(json.dumps(named).encode()).hexdigest()[:10]
    return Path(out_dir) / "searches" / f"{stage}-{digest}"


def storage_url(storage: str | None, folder: Path) -> str:
    """``search.storage``, or the SQLite file in the search's folder."""
    if storage and storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
        storage = f"sqlite:///{Path(storage[len('sqlite:///') :]).resolve()}"  # trial processes start elsewhere
    return storage or f"sqlite:///{(folder / 'optuna.db').resolve()}"


def open_study(url: str, folder: Path, control: dict[str, Any], seed: int, shared: bool) -> Any:
    """The search's Optuna study, created or loaded; a one-line ConfigError when its database cannot be
    opened (a server that is down, a wrong password, a driver that is not installed)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if url.startswith("sqlite:///"):
        folder.mkdir(parents=True, exist_ok=True)
    try:
        engine = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
        study = optuna.create_study(
            storage=optuna.storages.RDBStorage(url, engine_kwargs=engine),
            study_name=folder.name,
            pruner=make_pruner(control["prune"]),
            direction="maximize",
            load_if_exists=True,
        )
    except Exception as err:  # noqa: BLE001 - sqlalchemy's and the driver's errors, all the user's to fix
        hint = "; pip install -e '.[search]' installs the PostgreSQL driver" if "import" in str(err) else ""
        raise ConfigError(
            f"search.storage={redact(url)}: the study's database cannot be opened: {first_line(err)}{hint}"
        ) from None
    # seeded by the trials already in the study: a continued search does not propose its first trials again;
    # in a shared database also by the machine and process, or drivers that start together propose alike
    trial_seed = seed + len(study.trials)
    if shared:
        mixed = f"{trial_seed}-{socket.gethostname()}-{os.getpid()}".encode()
        trial_seed = int(hashlib.sha1(mixed).hexdigest()[:8], 16)
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
    from pipeline.studies.repeats import cell_name

    return {
        "name": cell_name("trial", trial.number, label),
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
    _check_bounds(base, ranges)
    folder = search_dir(argv, first.out_dir, first.stage)
    url = storage_url(control["storage"], folder)
    study = open_study(url, folder, control, first.seed, shared=control["storage"] is not None)
    where = {"study": study.study_name, "storage": url, "prune": control["prune"]}
    # the feature cache is shared by every trial (it depends on neither the head nor the rates)
    base = [*base, f"data.cache_dir={cache_dir(first)}"]
    argv = [redact(a) for a in argv]  # the command as written to files: without a database password
    RunFolder(folder).write_text("command.txt", "python train.py " + " ".join(argv) + "\n")
    print(f"search: {control['trials']} trial(s) of {', '.join(ranges)} in {folder} (the same command continues it)")
    rows_by_trial = _run_trials(study, first, base, ranges, control, folder, where, repeats)
    return _summarise(argv, url, study, rows_by_trial, ranges, control, folder)


def _check_stage(cfg: DictConfig, control: dict[str, Any]) -> None:
    spec = stage_spec(cfg.stage)
    if spec.study or not spec.fits or not spec.reports:
        raise ConfigError(f"search: stage={cfg.stage} does not train and validate one model; search a training stage")
    serial, world = cfg.launch.mode == "serial", expected_world_size(cfg)
    if serial and world > 1:  # Lightning's DDP workers would re-run the search itself and ask trials of their own
        raise ConfigError(
            f"a search's trials here would each start {world} processes (trainer.devices, num_nodes): give "
            "launch=local or launch=slurm (each trial in its own processes), or trainer.devices=1"
        )
    explicit = cfg.trainer.get("devices", "auto") not in ("auto", -1, "-1")
    per_trial = max(world if explicit else 1, cfg.launch.gpus_per_cell if not serial and on_gpu(cfg) else 1)
    if control["prune"] and per_trial > 1:
        raise ConfigError("search.prune=true prunes single-process trials; drop it for DDP trials")


def _check_bounds(base: list[str], ranges: dict[str, Any]) -> None:
    """Every range's bounds (every choice) checked as a value of its key before any trial is asked: a trial
    that could not start would stay in the study as running, and each rerun would ask it again."""
    for key, spec in ranges.items():
        for value in spec[1] if spec[0] == "choice" else spec[1:]:
            try:
                load_config([*base, f"{key}={shown(value)}"])
            except ConfigError as err:
                raise ConfigError(f"search.{key}: the value {shown(value)} is refused: {err}") from None


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
    left = study.get_trials(deepcopy=False, states=(states.RUNNING,))
    own = control["storage"] is None
    if left and not own:
        print(f"search: {len(left)} trial(s) are running elsewhere or were abandoned; not taken over")
    batch_size = _batch_size(first)
    resumed = [optuna.trial.Trial(study, t._trial_id) for t in left] if own else []
    while True:
        todo = resumed or [study.ask(dists) for _ in range(min(batch_size, control["trials"] - len(study.trials)))]
        resumed = []
        if not todo:  # and the trials other machines finished meanwhile (a shared study)
            finished = study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED, states.FAIL))
            return done | {t.number: _stored_rows(folder, t) for t in finished if t.number not in done}
        cells, refused = [], []
        for trial in todo:
            cell = trial_cell(trial, base, ranges, where)
            cell["argv"] += [f"out_dir={folder / cell['name']}"]
            try:  # the bounds were checked; a combination of values may still be refused
                cfg = load_config(cell["argv"])
            except ConfigError as err:
                refused.append({**repeats._row(cell, {}, None), "status": "failed", "error": f"ConfigError: {err}"})
                continue
            cell["stage"] = cfg.stage
            repeats._CHECKED[cell["name"]] = cfg
            cells.append(cell)
        rows = _run_batch(first, cells, folder, repeats) + refused
        for trial in todo:
            trial_rows = [r for r in rows if r["cell"].startswith(f"trial{trial.number:03d}-")]
            _tell(study, trial, trial_rows)
            done[trial.number] = trial_rows
            print(f"search: trial {trial.number} ({len(done)}/{control['trials']} done): {_line(trial_rows[0])}")


def _batch_size(cfg: DictConfig) -> int:
    """Trials asked at a time: one (serial); ``launch.parallel``, else one per GPU slot (local) or one."""
    if cfg.launch.mode == "serial":
        return 1
    if cfg.launch.parallel:
        return cfg.launch.parallel
    gpus = launch._visible_gpus() if cfg.launch.mode == "local" and launch._uses_gpu(cfg) else []
    return max(1, len(gpus) // max(1, cfg.launch.gpus_per_cell))


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
    # the row itself, for the summaries of machines that share the study (and of this one, for a failed
    # trial, which has no result.json)
    trial.set_user_attr("row", json.loads(json.dumps(row, default=str)))
    if row["status"] == "ok" and (row.get("val") or {}).get("acc") is not None:
        study.tell(trial, row["val"]["acc"])
    else:
        study.tell(trial, state=states.PRUNED if row["status"] == "pruned" else states.FAIL)


def _stored_rows(folder: Path, trial: Any) -> list[dict[str, Any]]:
    """A finished trial's rows from its cell's ``result.json`` (in this folder), else from the study."""
    for path in folder.glob(f"trial{trial.number:03d}-*/result.json"):
        return json.loads(path.read_text())
    if "row" in trial.user_attrs:
        row = dict(trial.user_attrs["row"])
        if row.get("run_dir") and not Path(row["run_dir"]).exists():
            row["note"] = "run elsewhere (a shared study): its run folder is on the machine that ran it"
        return [row]
    from pipeline.studies.repeats import _row

    status = {"COMPLETE": "ok", "PRUNED": "pruned"}.get(trial.state.name, "failed")
    val = {"acc": trial.value} if trial.value is not None else None
    cell = {"name": f"trial{trial.number:03d}", "params": trial.params, "seed": None}
    note = "run elsewhere (a shared study): its figures are in that machine's folder"
    return [{**_row(cell, {"val": val}, None), "status": status, "note": note}]


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
