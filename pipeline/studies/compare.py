"""Paired comparison of two runs on the same test images: ``python -m pipeline.studies.compare RUN_A RUN_B``.

Each argument is a run folder (or its ``test_predictions.csv``); prints both accuracies with their
95% Wilson intervals and the exact McNemar test (see docs/uncertainty.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.runner.evaluation import paired_mcnemar, read_correct
from pipeline.studies.statistics import wilson_interval


def _predictions(path: str) -> Path:
    candidate = Path(path)
    return candidate / "test_predictions.csv" if candidate.is_dir() else candidate


def compare(a: str, b: str) -> dict:
    correct_a, correct_b = (read_correct(_predictions(p)) for p in (a, b))
    result = paired_mcnemar(correct_a, correct_b)
    for name, correct in (("a", correct_a), ("b", correct_b)):
        right = sum(correct.values())
        result[f"{name}_acc"] = right / len(correct)
        result[f"{name}_acc_ci95"] = list(wilson_interval(right, len(correct)))
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        r = compare(*argv)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, path in zip("ab", argv):
        low, high = r[f"{name}_acc_ci95"]
        print(f"{name.upper()}: {r[f'{name}_acc']:.4f} [{low:.4f}, {high:.4f}]  {path}")
    print(
        f"McNemar (exact, {r['n']} images): A right / B wrong {r['a_only']}, B right / A wrong {r['b_only']}, "
        f"p = {r['p_value']:.3g}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
