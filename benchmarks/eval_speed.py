#!/usr/bin/env python
"""Evaluation speed on CPU: evaluation batch size, with and without test-time flip; and
``stage=test`` (Lightning's ``trainer.test``) against ``predict.py`` on the same images.

    python benchmarks/eval_speed.py [--data ../shared/data/cats_and_dogs_small] [--images 400]

Runs the project's evaluation path (``TransferClassifier.logits`` in eval mode, the validation
loader with one worker per core) over the first ``--images`` validation images of
EfficientNet-Lite0 at 224 px, at batch 32 (what evaluation used before) and at the CPU evaluation
batch (``datamodules.image_folder.CPU_EVAL_BATCH``), each with ``model.tta_flip`` off and on;
prints images per second (median of 3 passes). The second table times, on the same images and
with test-time flip on, the whole ``stage=test`` evaluation (a Trainer testing the evaluation
loader, metrics included) and ``predict.py``'s path (``pipeline.prediction.predict_files``, loader
and inference included), each the median of 3 passes.
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

    from datamodules.data_index import scan_splits
    from datamodules.image_folder import CPU_EVAL_BATCH, ImageFolderDataModule, available_cores

    torch.set_num_threads(available_cores())
    model, _, _ = steps.build(args.backbone, args.image_size)
    model.eval()
    index = scan_splits(args.data, ("val",))
    dm = ImageFolderDataModule(index, args.image_size, 32, None, "none", model.backbone.mean, model.backbone.std)
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
    compare_test_and_predict(model, index, subset.indices, args)


def compare_test_and_predict(model, index, picked: list[int], args) -> None:
    """images/s of stage=test's evaluation and of predict.py on the same validation images."""
    import dataclasses

    from lightning.pytorch import Trainer

    from datamodules.image_folder import ImageFolderDataModule, default_num_workers
    from pipeline.prediction import predict_files

    samples = [index.samples["val"][i] for i in picked]
    sub = dataclasses.replace(index, samples={"test": samples})
    model.hparams.tta_flip = True
    workers = default_num_workers()
    dm = ImageFolderDataModule(sub, args.image_size, 32, workers, "none", model.backbone.mean, model.backbone.std)
    timings: dict[str, list[float]] = {"stage=test (trainer.test)": [], "predict.py (predict_files)": []}
    for _ in range(3):
        trainer = Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        started = time.perf_counter()
        trainer.test(model, datamodule=dm, verbose=False)
        timings["stage=test (trainer.test)"].append(len(samples) / (time.perf_counter() - started))
        started = time.perf_counter()
        predict_files(model, [path for path, _ in samples], 32, workers, "cpu")
        timings["predict.py (predict_files)"].append(len(samples) / (time.perf_counter() - started))
    print(f"\n### stage=test vs predict.py on CPU, {len(samples)} images, test-time flip on, {workers} workers\n")
    print("| path | images/s (median of 3) |")
    print("|---|---|")
    for name, rates in timings.items():
        print(f"| {name} | {sorted(rates)[1]:.1f} |")


if __name__ == "__main__":
    main()
