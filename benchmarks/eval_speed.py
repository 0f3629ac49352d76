#!/usr/bin/env python
"""Validation speed on CPU: evaluation batch size, with and without test-time flip.

    python benchmarks/eval_speed.py [--data ../shared/data/cats_and_dogs_small] [--images 400]

Runs the project's evaluation path (``TransferClassifier.logits`` in eval mode, the validation
loader with one worker per core) over the first ``--images`` validation images of
EfficientNet-Lite0 at 224 px, at batch 32 (what evaluation used before) and at the CPU evaluation
batch (``datamodules.image_folder.CPU_EVAL_BATCH``), each with ``model.tta_flip`` off and on;
prints images per second (median of 3 passes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cats_and_dogs_small"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    import steps
    from torch.utils.data import Subset

    from datamodules.image_folder import CPU_EVAL_BATCH, ImageFolderDataModule, available_cores, scan_splits

    torch.set_num_threads(available_cores())
    model, _, _ = steps.build(args.backbone, args.image_size)
    model.eval()
    index = scan_splits(args.data, ("val",), check_files=False)
    dm = ImageFolderDataModule(args.data, args.image_size, 32, None, "none", model.backbone.mean, model.backbone.std)
    dm.index = index
    dm.setup("validate")
    # every other image, so both classes are in the sample
    subset = Subset(dm.datasets["val"], list(range(0, len(dm.datasets["val"]), 2))[: args.images])
    rows = []
    for batch in (32, CPU_EVAL_BATCH):
        for flip in (False, True):
            model.hparams.tta_flip = flip
            rates = []
            for _ in range(3):
                loader = dm.loader(subset, train=False, batch_size=batch)
                started, seen = time.perf_counter(), 0
                with torch.inference_mode():
                    for images, target in loader:
                        model.logits(images)
                        seen += target.shape[0]
                rates.append(seen / (time.perf_counter() - started))
            rows.append((batch, flip, sorted(rates)[1]))
    print(
        f"### validation on CPU, {args.backbone} {args.image_size} px, {len(subset)} images, "
        f"{available_cores()} cores\n"
    )
    print("| batch | test-time flip | images/s |")
    print("|---|---|---|")
    for batch, flip, rate in rows:
        print(f"| {batch} | {'on' if flip else 'off'} | {rate:.1f} |")


if __name__ == "__main__":
    main()
