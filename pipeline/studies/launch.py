"""Where a study's cells run: ``launch.mode=serial|local|slurm`` (``launch=local`` for short).

``serial`` runs the cells one after another in this process (``repeats.run_cell``). ``local`` starts each
cell as its own process (``python -m pipeline.studies.launch SPEC``), ``launch.parallel`` at a time, each
with its own GPUs (``CUDA_VISIBLE_DEVICES``); ``slurm`` submits them as one job array through submitit.
Every launcher runs the same ``run_cell`` on the same cell and hands its rows back through a file
(``<study>/launch/<cell>.rows.json``), and the study reads the rows in the cells' order, so the summary does
not depend on the launcher. A cell whose process dies (a crash, the OOM killer) leaves no rows: it is a
failed row naming its log, and the other cells go on. Finished cells (``result.json``) are not run again,
so the same command continues an interrupted study whatever launched it.

Requeue under SLURM has one owner: SLURM itself (``scontrol requeue``, preemption) restarts the array
task, submitit re-runs the same pickled call, and ``run_cell`` resumes the cell's ``last.ckpt`` (written at
every epoch's end; submitit's worker ignores SIGTERM, so a requeued task is killed after SLURM's KillWait
and continues from its last epoch). submitit's ``Checkpointable`` and Lightning's
``SLURMEnvironment(auto_requeue=True)`` (``slurm_requeue=true``) are not used: each installs its own
signal handler and requeues the job itself, and two owners requeue twice or exit early (Lightning issue
20056), so ``slurm_requeue=true`` is refused with ``launch=slurm``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from core.errors import ConfigError, first_line
from pipeline.runner.run_dir import RunFolder, is_rank_zero

ROOT = Path(__file__).resolve().parents[2]
Rows = list[dict[str, Any]]
RunCell = Callable[[dict[str, Any], Path], Rows]


def expand_launch(argv: list[str]) -> list[str]:
    """``launch=X`` is short for ``launch.mode=X``."""
    return [f"launch.mode={a[len('launch=') :]}" if a.startswith("launch=") else a for a in argv]


def take_launch(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the ``launch.*`` overrides, the rest): the launcher is not part of the study's name, so a study
    started serially can be continued on SLURM."""
    argv = expand_launch(argv)
    return [a for a in argv if a.startswith("launch.")], [a for a in argv if not a.startswith("launch.")]


def check_launch(cfg: DictConfig) -> None:
    """Refuse, in one line and before any cell starts, a launcher that cannot run here."""
    mode = cfg.launch.mode
    if mode == "slurm":
        if shutil.which("sbatch") is None:
            raise ConfigError("launch=slurm needs SLURM's sbatch on PATH (not found here); use launch=local")
        try:
            import submitit  # noqa: F401
        except ImportError as err:
            raise ConfigError("launch=slurm needs submitit: pip install -e '.[slurm]'") from err
        sbatch_options(cfg)
        if cfg.slurm_requeue:
            raise ConfigError("launch=slurm owns requeue (a requeued cell resumes its last.ckpt); drop slurm_requeue")


def rows_path(parent: Path, cell: dict[str, Any]) -> Path:
    return parent / "launch" / f"{cell['name']}.rows.json"


def run_cells(cfg: DictConfig, todo: list[dict[str, Any]], parent: Path, run_cell: RunCell) -> Rows | None:
    """Every cell's rows in the cells' order (``None``: submitted to SLURM without waiting)."""
    mode = cfg.launch.mode
    if mode == "serial":
        rows = []
        for number, cell in enumerate(todo, 1):
            if is_rank_zero():
                print(f"sweep: run {number}/{len(todo)}: {cell['name']}")
            rows += run_cell(cell, parent / cell["name"])
        return rows
    pending = [c for c in todo if not (parent / c["name"] / "result.json").is_file()]
    print(f"sweep: {len(todo) - len(pending)} cell(s) finished before; {len(pending)} to run ({mode})")
    if pending and mode == "local":
        _run_local(cfg, pending, parent)
    elif pending and not _run_slurm(cfg, pending, parent):
        return None
    return [row for cell in todo for row in collect(parent, cell)]


def collect(parent: Path, cell: dict[str, Any]) -> Rows:
    """A cell's rows: its result (finished), its rows file (failed inside), or a failed row (it died)."""
    for path in (parent / cell["name"] / "result.json", rows_path(parent, cell)):
        if path.is_file():
            return json.loads(path.read_text())
    log = parent / "launch" / f"{cell['name']}.log"
    exit_file = parent / "launch" / f"{cell['name']}.exit"
    status = exit_file.read_text().strip() if exit_file.is_file() else "no exit code"
    where = str(log) if log.is_file() else str(parent / "submitit")
    from pipeline.studies.repeats import _row

    error = f"process ended ({status}) without a result; see {where}"
    return [{**_row(cell, {}, None), "status": "failed", "error": error}]


def _forget_rows(parent: Path, cells: list[dict[str, Any]]) -> None:
    """A relaunched cell's rows from an earlier try (a failure) must not stand in for its new result."""
    for cell in cells:
        rows_path(parent, cell).unlink(missing_ok=True)


def run_one(cell: dict[str, Any], parent: str) -> Rows:
    """One cell in this process (a local worker, or a SLURM task): its rows, also written to its rows file
    by global rank zero."""
    from pipeline.studies.repeats import _run_cell

    folder = Path(parent)
    manager = is_rank_zero()
    rows = _run_cell(cell, folder / cell["name"], manager)
    if manager:
        RunFolder(folder / "launch").write_json(rows_path(folder, cell).name, rows)
    return rows


# --- local: one process per cell ---------------------------------------------------------------------


def _visible_gpus() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _uses_gpu(cfg: DictConfig) -> bool:
    return cfg.trainer.get("accelerator") != "cpu" and cfg.launch.gpus_per_cell > 0


def _run_local(cfg: DictConfig, cells: list[dict[str, Any]], parent: Path) -> None:
    gpus = _visible_gpus() if _uses_gpu(cfg) else []
    per_cell = cfg.launch.gpus_per_cell
    if gpus and len(gpus) < per_cell:
        raise ConfigError(f"launch.gpus_per_cell={per_cell} but only {len(gpus)} GPU(s) are visible")
    slots = [gpus[i : i + per_cell] for i in range(0, len(gpus) - per_cell + 1, per_cell)] if gpus else []
    parallel = cfg.launch.parallel or max(1, len(slots))
    if slots:
        parallel = min(parallel, len(slots))
    free = slots[:parallel] if slots else [[] for _ in range(parallel)]
    cores = max(1, len(os.sched_getaffinity(0)) // parallel)
    lock, queue = threading.Lock(), list(cells)
    _forget_rows(parent, cells)
    (parent / "launch").mkdir(parents=True, exist_ok=True)
    procs: dict[int, subprocess.Popen] = {}

    def worker(devices: list[str]) -> None:
        while True:
            with lock:
                if not queue:
                    return
                cell = queue.pop(0)
            print(f"sweep: starting {cell['name']}" + (f" on GPU {','.join(devices)}" if devices else ""))
            _local_process(cell, parent, devices, cores, procs)

    workers = [threading.Thread(target=worker, args=(devices,), daemon=True) for devices in free]
    for t in workers:
        t.start()
    try:
        for t in workers:
            t.join()
    except BaseException:  # Ctrl-C: stop the cells (each saves its state); the same command continues
        for proc in list(procs.values()):
            proc.terminate()
        raise


def _local_process(cell: dict[str, Any], parent: Path, devices: list[str], threads: int, procs: dict) -> None:
    spec = parent / "launch" / f"{cell['name']}.spec.json"
    RunFolder(spec.parent).write_json(spec.name, {"cell": cell, "parent": str(parent)})
    env = dict(os.environ)
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    else:  # CPU cells share the cores: N processes of all-core thread pools would each wait on the others
        env.setdefault("OMP_NUM_THREADS", str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    log = parent / "launch" / f"{cell['name']}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.studies.launch", str(spec)], cwd=ROOT, env=env, stdout=out, stderr=out
        )
        procs[proc.pid] = proc
        code = proc.wait()
    procs.pop(proc.pid, None)
    (parent / "launch" / f"{cell['name']}.exit").write_text(f"exit code {code}\n")
    if code != 0:
        print(f"sweep: {cell['name']} ended with exit code {code}; see {log}")


# --- slurm: one job array through submitit -----------------------------------------------------------


def _job_file(parent: Path) -> Path:
    return parent / "launch" / "slurm_job.txt"


def _queued(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, check=False)
    return out.returncode == 0 and bool(out.stdout.strip())


def _run_slurm(cfg: DictConfig, cells: list[dict[str, Any]], parent: Path) -> bool:
    """Submit (unless this study's array is still queued); True when the cells have ended."""
    job_file = _job_file(parent)
    job_id = job_file.read_text().strip() if job_file.is_file() else ""
    if job_id and _queued(job_id):
        print(f"sweep: job array {job_id} of this study is still in the queue; not submitted again")
    else:
        _forget_rows(parent, cells)
        job_id = _submit(cfg, cells, parent)
        RunFolder(job_file.parent).write_text(job_file.name, job_id + "\n")
    print(f"sweep: SLURM job array {job_id}: watch it with `squeue -j {job_id}`; logs in {parent / 'submitit'}")
    if not cfg.launch.wait:
        print("sweep: run the same command again with launch.wait=true (or once the array ends) for the summary")
        return False
    while _queued(job_id):
        time.sleep(2)
    return True


def sbatch_options(cfg: DictConfig) -> dict[str, str]:
    """``launch.sbatch=[qos=high,...]`` as submitit's ``slurm_additional_parameters``."""
    options = {}
    for item in cfg.launch.sbatch:
        name, sep, value = str(item).partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"launch.sbatch entries are name=value (e.g. qos=high), got {item!r}")
        options[name.strip().lstrip("-").replace("-", "_")] = value.strip()
    return options


def slurm_parameters(cfg: DictConfig, cells: int) -> dict[str, Any]:
    """submitit's parameters for one cell per array task: tasks per node = the cell's devices (SLURM
    starts the DDP processes; Lightning's SLURMEnvironment joins them)."""
    launch = cfg.launch
    gpus = launch.gpus_per_cell if _uses_gpu(cfg) else 0
    devices = cfg.trainer.get("devices")
    tasks = devices if isinstance(devices, int) and devices > 0 else max(gpus, 1)
    params: dict[str, Any] = {
        "tasks_per_node": tasks,
        "nodes": int(cfg.trainer.get("num_nodes") or 1),
        "timeout_min": launch.time_min,
        "slurm_job_name": "study",
        "slurm_array_parallelism": launch.parallel or cells,
        "slurm_setup": [f"cd {ROOT}", f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"],
    }
    optional = {
        "gpus_per_node": gpus or None,
        "cpus_per_task": launch.cpus_per_cell,
        "mem_gb": launch.mem_gb,
        "slurm_partition": launch.partition,
        "slurm_account": launch.account,
        "slurm_additional_parameters": sbatch_options(cfg) or None,
    }
    return params | {k: v for k, v in optional.items() if v is not None}


def _submit(cfg: DictConfig, cells: list[dict[str, Any]], parent: Path) -> str:
    import submitit

    executor = submitit.AutoExecutor(folder=parent / "submitit", cluster="slurm")
    executor.update_parameters(**slurm_parameters(cfg, len(cells)))
    try:
        jobs = executor.map_array(run_one, cells, [str(parent)] * len(cells))
    except Exception as err:  # noqa: BLE001 - sbatch's refusal (a partition, an account) is the user's to fix
        raise ConfigError(f"sbatch refused the study's job array: {first_line(err)}") from err
    return str(jobs[0].job_id).split("_")[0]


def main(spec_path: str) -> int:
    """A local worker: run the cell named in the spec file."""
    spec = json.loads(Path(spec_path).read_text())
    run_one(spec["cell"], spec["parent"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
