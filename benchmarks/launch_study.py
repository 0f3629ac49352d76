#!/usr/bin/env python
"""One toy study (``seeds=[1,2] sweep.model.dropout=[0.0,0.5]``: 4 cells) launched three ways: serial,
``launch=local launch.parallel=N`` and, where SLURM and munge are installed and this runs as root, as a job
array on a one-node cluster started for the benchmark (tests/slurm_cluster.py). Prints each launcher's
wall time, its ratio to serial, and whether its summary.md equals the serial one (wall times aside).

    python benchmarks/launch_study.py [--parallel 2] [--epochs 4] [--image-size 64] [--no-slurm]

Each command runs as ``python train.py ...`` in a fresh process, as a user would start it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def timed_study(args: list[str], env: dict[str, str] | None = None) -> tuple[float, Path]:
    """Wall time of ``python train.py args`` and its study folder."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"study failed ({' '.join(args[-3:])}):\n{proc.stderr[-3000:]}")
    out_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("out_dir=")))
    print(f"{out_dir.name}: {elapsed:.1f} s", file=sys.stderr, flush=True)
    return elapsed, next((out_dir / "sweeps").iterdir())


def table(rows: list[tuple[str, float, bool]]) -> str:
    serial = rows[0][1]
    lines = ["| launcher | wall time (s) | vs serial | same summary |", "|---|---|---|---|"]
    lines += [f"| {name} | {t:.1f} | {t / serial:.2f}x | {'yes' if same else 'NO'} |" for name, t, same in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--no-slurm", action="store_true")
    options = parser.parse_args()
    from conftest import backbone_weights, fast_args
    from helpers import comparable
    from toy_data import make_image_tree

    work = Path(tempfile.mkdtemp(prefix="launch-bench-"))
    try:
        root = make_image_tree(work / "data")
        weights = shutil.copy(backbone_weights(), work / "weights.pth")  # the stand-in outlives this process

        def study(name: str, *launch: str) -> list[str]:
            extra = {"stage": "frozen", "trainer.max_epochs": str(options.epochs)}
            extra |= {"data.image_size": str(options.image_size), "model.weights": str(weights)}
            return [*fast_args(root, work / name, **extra), "seeds=[1,2]", "sweep.model.dropout=[0.0,0.5]", *launch]

        serial_s, serial_dir = timed_study(study("serial"))
        rows = [("serial", serial_s, True)]
        local_s, local_dir = timed_study(study("local", "launch=local", f"launch.parallel={options.parallel}"))
        rows.append((f"local, parallel={options.parallel}", local_s, _same(serial_dir, local_dir, comparable)))
        if not options.no_slurm:
            from slurm_cluster import _missing, one_node_cluster

            if _missing():
                print(f"(no SLURM here: {', '.join(_missing())} missing)")
            else:
                with one_node_cluster(work / "slurm-cluster") as cluster:
                    launch = ("launch=slurm", "launch.wait=true", "launch.cpus_per_cell=1")
                    slurm_s, slurm_dir = timed_study(study("slurm", *launch), env=cluster.env)
                rows.append(("slurm job array (1 node, 2 CPUs)", slurm_s, _same(serial_dir, slurm_dir, comparable)))
        print(table(rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _same(a: Path, b: Path, comparable) -> bool:
    return comparable(a / "summary.md") == comparable(b / "summary.md")


if __name__ == "__main__":
    main()
