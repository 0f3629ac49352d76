#!/usr/bin/env python
"""How the pre-training scan scales with the number of files: first scan vs re-scan, and memory.

Every run checks that each image decodes before training (``datamodules.data_index.scan_splits``);
the verdicts are remembered in ``data.cache_dir`` keyed by path, size and modification time, so a
re-scan of an unchanged folder only stats the files. This script generates JPEGs (random pictures,
160x120), then times, for each size in a fresh process, a first scan (nothing remembered) and a
re-scan, with the process's peak resident memory, and prints a table:

    python benchmarks/scan_scaling.py                  # 4,000, 25,000 and 100,000 files
    python benchmarks/scan_scaling.py --files 25000    # one size; last line: rescan speedup at N files: X
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPLITS = {"train": 0.5, "validation": 0.25, "test": 0.25}


def make_jpegs(root: Path, n: int, seed: int = 0) -> None:
    """``n`` small JPEGs in the seed's layout (two classes); a few hundred distinct pictures are
    reused, since encoding, not writing, is the slow part and the scan decodes each file anyway."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(256):
        pixels = rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
        path = root / "_tmp.jpg"
        root.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=85)
        pictures.append(path.read_bytes())
    (root / "_tmp.jpg").unlink()
    i = 0
    for split, share in SPLITS.items():
        for name in ("cats", "dogs"):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(int(n * share / 2)):
                (folder / f"{name}.{i}.jpg").write_bytes(pictures[i % len(pictures)])
                i += 1


def speedup(first_s: float, rescan_s: float) -> float:
    return first_s / rescan_s if rescan_s > 0 else float("inf")


def timed(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    started = clock()
    fn()
    return clock() - started


def measure(root: Path, cache: Path, threads: int) -> dict:
    """First scan and re-scan of ``root`` in this process (run it in a fresh one per size)."""
    from datamodules.data_index import scan_splits

    files = sum(1 for p in root.rglob("*.jpg"))
    first = timed(lambda: scan_splits(root, cache_dir=cache, threads=threads))
    rescan = timed(lambda: scan_splits(root, cache_dir=cache, threads=threads))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"files": files, "first_s": first, "rescan_s": rescan, "peak_rss_mb": peak_mb}


def table(rows: list[dict]) -> str:
    lines = [
        "| files | first scan (s) | per file (ms) | re-scan (s) | re-scan speedup | peak RSS (MB) "
        "| RSS per 1,000 files (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['files']:,} | {r['first_s']:.2f} | {1000 * r['first_s'] / r['files']:.3f} | {r['rescan_s']:.3f} "
            f"| {speedup(r['first_s'], r['rescan_s']):.0f}x | {r['peak_rss_mb']:.0f} "
            f"| {1000 * r['peak_rss_mb'] / r['files']:.2f} |"
        )
    return "\n".join(lines)


def run_size(n: int, work: Path, threads: int) -> dict:
    data, cache = work / f"data-{n}", work / f"cache-{n}"
    if not data.is_dir():
        started = time.perf_counter()
        make_jpegs(data, n)
        print(f"generated {n:,} JPEGs in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    shutil.rmtree(cache, ignore_errors=True)
    proc = subprocess.run(
        [sys.executable, __file__, "--measure", str(data), str(cache), str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=None, help="one size (default: 4000, 25000, 100000)")
    parser.add_argument("--threads", type=int, default=2, help="decode threads (the project's default: cores)")
    parser.add_argument("--work", default=None, help="folder for the generated files (default: a temp folder)")
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        data, cache, threads = args.measure
        print(json.dumps(measure(Path(data), Path(cache), int(threads))))
        return
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="scan_scaling-"))
    sizes = [args.files] if args.files else [4000, 25000, 100000]
    rows = [run_size(n, work, args.threads) for n in sizes]
    print(table(rows))
    last = rows[-1]
    print(f"rescan speedup at {last['files']} files: {speedup(last['first_s'], last['rescan_s']):.1f}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
