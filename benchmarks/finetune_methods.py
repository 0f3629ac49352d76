#!/usr/bin/env python
"""The fine-tuning methods' table (docs/backbones.md): finished runs side by side, each against a reference.

    python benchmarks/finetune_methods.py --reference RUN_DIR[,TIME_LOG] NAME=RUN_DIR[,TIME_LOG] ...

Each run is a run folder made with ``eval.shifts=all`` (its ``metrics.json``, ``test_predictions.csv`` and
``shift_predictions.csv``); ``TIME_LOG`` is the output of ``/usr/bin/time -v`` around its ``train.py``
(peak memory, wall time, and CPU time: user + system, which moves less than the wall time on a shared
machine). Prints one markdown row per run: test accuracy with its 95% Wilson interval, the mean shift
accuracy, trainable parameters, peak RSS, wall and CPU time, and exact McNemar tests against the reference
on the clean test images and on every shifted copy (images paired by file and copy).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.runner.evaluation import paired_mcnemar, read_correct  # noqa: E402


def shifted_correct(run: Path) -> dict[str, bool]:
    """``{file|copy: right}`` over every shifted copy of ``shift_predictions.csv`` (unreadable: left out)."""
    with open(run / "shift_predictions.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.reader(f))
    header, out = rows[0], {}
    for row in rows[1:]:
        for copy, predicted in zip(header[2:], row[2:]):
            if predicted:
                out[f"{row[0]}|{copy}"] = predicted == row[1]
    return out


def time_log(path: Path | None) -> dict[str, float]:
    if path is None or not path.is_file():
        return {}
    text = path.read_text(errors="replace")
    out = {}
    if m := re.search(r"Maximum resident set size \(kbytes\): (\d+)", text):
        out["peak_mb"] = int(m.group(1)) / 1024
    cpu = [float(m.group(1)) for m in re.finditer(r"(?:User|System) time \(seconds\): ([\d.]+)", text)]
    if cpu:
        out["cpu_s"] = sum(cpu)
    if m := re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text):
        seconds = 0.0
        for part in m.group(1).split(":"):
            seconds = seconds * 60 + float(part)
        out["wall_s"] = seconds
    return out


def row(name: str, run: Path, log: Path | None, reference: Path) -> str:
    metrics = json.loads((run / "metrics.json").read_text())
    test, shift = metrics["test"], metrics.get("shift") or {}
    low, high = test["acc_ci95"]
    clean = paired_mcnemar(read_correct(run / "test_predictions.csv"), read_correct(reference / "test_predictions.csv"))
    shifted = paired_mcnemar(shifted_correct(run), shifted_correct(reference), "the shifted copies")
    timed = time_log(log)
    peak = f"{timed['peak_mb']:,.0f} MB" if "peak_mb" in timed else "n/a"
    wall = f"{timed.get('wall_s', metrics.get('wall_time_s', 0)) / 60:.1f} min"
    cpu = f"{timed['cpu_s'] / 60:.1f} min" if "cpu_s" in timed else "n/a"
    shift_acc = f"{100 * shift['shift_acc']:.1f}%" if "shift_acc" in shift else "n/a"
    return (
        f"| {name} | {100 * test['acc']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] | {shift_acc} "
        f"| {metrics.get('trainable_params', 0):,} | {peak} | {wall} | {cpu} "
        f"| {clean['a_only']} / {clean['b_only']}, p = {clean['p_value']:.2g} "
        f"| {shifted['a_only']} / {shifted['b_only']}, p = {shifted['p_value']:.2g} |"
    )


def split(spec: str) -> tuple[Path, Path | None]:
    run, _, log = spec.partition(",")
    return Path(run), Path(log) if log else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="RUN_DIR[,TIME_LOG] the McNemar tests compare against")
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR[,TIME_LOG]")
    args = parser.parse_args(argv)
    reference, _ = split(args.reference)
    print(
        "| run | test acc [95% CI] | shift acc (16 copies) | trainable params | peak RSS | wall time | CPU time "
        "| McNemar clean: right only here / only ref | McNemar shifted: same |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in [f"reference={args.reference}", *args.runs]:
        name, _, rest = spec.partition("=")
        run, log = split(rest)
        try:
            print(row(name, run, log, reference))
        except (OSError, KeyError, ValueError) as err:  # not a finished run with eval.shifts=all
            print(f"error: {name}: {run} is not a finished run with a shift report ({err})", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
