#!/usr/bin/env python
"""What TensorBoard's image views cost with many classes: one frozen-stage epoch of a toy folder with
N classes (random 32 px pictures), with the views on (``log.images_every_n_epochs=1``: confusion matrix,
error grids, PR curve) and off, each in a fresh process; wall time, peak resident memory and the
warning lines printed. Prints a table:

    python benchmarks/many_classes.py                 # 200 classes of 10/3/3 images
    python benchmarks/many_classes.py --classes 50
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_folder(root: Path, classes: int, per_split: dict[str, int], size: int = 32) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in per_split.items():
        for c in range(classes):
            folder = root / split / f"class{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def one_run(root: Path, out: Path, views: bool) -> dict:
    """A frozen-stage epoch in a fresh process: its wall time, peak memory and warning lines."""
    args = [
        "stage=frozen", f"data.root={root}", "data.source=none", f"out_dir={out}", "model.backbone=tiny_cnn",
        "model.pretrained=false", "data.image_size=32", "data.batch_size=32", "data.num_workers=0",
        "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.devices=1",
        f"log.images_every_n_epochs={1 if views else 0}",
    ]
    started = time.time()
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True)
    seconds = time.time() - started
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    warnings = [line for line in done.stderr.splitlines() + done.stdout.splitlines() if line.startswith("warning:")]
    return {"seconds": seconds, "peak_mb": peak, "warnings": len(warnings)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        make_folder(root, args.classes, {"train": 10, "validation": 3, "test": 3})
        rows = {}
        for views in (False, True):  # off first: the peak memory of children only grows
            rows[views] = one_run(root, Path(tmp) / f"runs-{views}", views)
    header = f"| {args.classes} classes, one frozen epoch | wall time (s) | peak RSS of any run so far (MB) |"
    print(header + " warning lines |")
    print("|---|---|---|---|")
    for views, row in rows.items():
        name = "views on (log.images_every_n_epochs=1)" if views else "views off"
        print(f"| {name} | {row['seconds']:.1f} | {row['peak_mb']:.0f} | {row['warnings']} |")
    print(json.dumps({str(k): v for k, v in rows.items()}))


if __name__ == "__main__":
    main()
