#!/usr/bin/env python
"""How far from this machine's limit each method runs: model FLOPs per image x images per second,
as a fraction of the measured peak matmul and convolution FLOP/s.

    python benchmarks/roofline.py                                   # Lite0, 224 px, CPU
    python benchmarks/roofline.py --backbone vgg16 --image-size 150

Peak: the best of several float32 matrix multiplications (2048 x 2048) and 3x3 convolutions
(256 -> 256 channels, 56 x 56, channels_last), FLOPs counted by torch's FlopCounterMode. Model
FLOPs: the forward pass counted block by block, backward as twice the forward it passes through. Each
method runs on synthetic batches (no loader) with the project's own model, trainable set and
optimizer groups (``benchmarks/steps.py``); the table prints FLOPs per image, images per second,
the achieved FLOP/s and its fraction of the peak.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def best_rate(work: Callable[[], None], flops: float, repeats: int = 5, sync=lambda: None) -> float:
    """FLOP/s of the fastest of ``repeats`` timed runs of ``work`` (after one untimed run)."""
    work()
    sync()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        sync()
        best = min(best, time.perf_counter() - started)
    return flops / best


def peak_flops(device: torch.device) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    matmul = best_rate(lambda: a @ b, 2 * n**3, sync=sync)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(device, memory_format=torch.channels_last)
    x = torch.randn(8, 256, 56, 56, device=device).contiguous(memory_format=torch.channels_last)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        conv(x)
    with torch.no_grad():
        convolution = best_rate(lambda: conv(x), counter.get_total_flops(), sync=sync)
    return {"matmul": matmul, "conv": convolution}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=None, help="default: 4 for features on CPU, else 32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per method")
    args = parser.parse_args()
    import steps

    device = torch.device(args.device)
    if device.type == "cpu":
        from datamodules.image_folder import available_cores

        torch.set_num_threads(available_cores())
    peak = peak_flops(device)
    model, plan, cfg = steps.build(args.backbone, args.image_size)
    rows = []
    for method in steps.METHODS:
        batch = args.batch or (4 if method == "features" and device.type == "cpu" else 32)
        step = steps.make_step(model, plan, cfg, method, batch, device)
        flops = steps.flops_per_image(model, plan, method, args.image_size)
        rate = steps.images_per_second(step, device, seconds=args.seconds)
        rows.append((method, batch, flops, rate))
    top = max(peak.values())
    print(
        f"### {args.backbone}, {args.image_size} px, {device.type} ({torch.get_num_threads()} threads): "
        f"peak {peak['matmul'] / 1e9:.1f} GFLOP/s matmul, {peak['conv'] / 1e9:.1f} GFLOP/s 3x3 conv\n"
    )
    print("| method | batch | GFLOPs per image | images/s | achieved GFLOP/s | fraction of peak |")
    print("|---|---|---|---|---|---|")
    for method, batch, flops, rate in rows:
        achieved = flops * rate
        print(f"| {method} | {batch} | {flops / 1e9:.3f} | {rate:.1f} | {achieved / 1e9:.1f} | {achieved / top:.2f} |")


if __name__ == "__main__":
    main()
