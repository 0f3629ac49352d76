#!/usr/bin/env python
"""One short GPU check (under 5 minutes on one GPU): does the project run on CUDA, and how fast?

    python benchmarks/gpu_check.py            # prints one markdown table; --quick for a smoke run

1. Speed: images per second and peak GPU memory of the seed's three methods (``benchmarks/steps.py``:
   feature extraction, frozen training step, fine-tune training step) for VGG16 at 150 px and
   EfficientNet-Lite0 at 224 px, random weights (nothing is downloaded), batch 32, on synthetic
   batches: fp32 vs bf16 autocast, channels_last on/off, and ``torch.compile`` (bf16 +
   channels_last only, where it is meant to be used).
2. The real pipeline: ``train.py stage=finetune`` on generated toy images on one GPU (precision
   auto = bf16-mixed), and, with two or more GPUs, the same with ``trainer.devices=2``, whose
   replicas must agree (``ddp/differing_tensors`` = 0 at every epoch).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))

MODELS = (("vgg16", 150), ("efficientnet_lite0", 224))
VARIANTS = (  # precision, channels_last, compile
    ("fp32", False, False),
    ("fp32", True, False),
    ("bf16", False, False),
    ("bf16", True, False),
    ("bf16", True, True),
)


def speed_rows(device: torch.device, seconds: float, variants=VARIANTS) -> list[dict]:
    import steps

    rows = []
    for backbone, size in MODELS:
        for precision, channels_last, compiled in variants:
            model, plan, cfg = steps.build(backbone, size, channels_last=channels_last)
            for method in steps.METHODS:
                row = {
                    "backbone": f"{backbone} {size}px",
                    "method": method,
                    "precision": precision,
                    "channels_last": channels_last,
                    "compile": compiled,
                }
                started = time.perf_counter()
                # One failing configuration (a compile error, out of memory) must not cost the rest of
                # a check that a session may get to run only once: it is reported in its row.
                try:
                    torch.cuda.reset_peak_memory_stats(device)
                    step = steps.make_step(model, plan, cfg, method, 32, device, precision)
                    if compiled:
                        model.forward_features = torch.compile(model.forward_features)
                    row["images_per_s"] = steps.images_per_second(
                        step, device, warmup=3 if compiled else 2, seconds=seconds
                    )
                    row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                except Exception as error:  # noqa: BLE001 - reported, not hidden
                    first_line = (str(error).splitlines() or [""])[0][:120]
                    row["error"] = f"{type(error).__name__}: {first_line}"
                    torch.cuda.empty_cache()
                row["wall_s"] = time.perf_counter() - started
                rows.append(row)
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


PIPELINE_RUNS = (  # (label, GPUs, extra overrides): a random ResNet-18, then Lite0 with its offline weights compiled
    ("resnet18, random weights", 1, ["model.backbone=resnet18", "model.pretrained=false"]),
    ("resnet18, random weights", 2, ["model.backbone=resnet18", "model.pretrained=false"]),
    (
        "efficientnet_lite0, ImageNet weights, speed.compile=true",
        1,
        ["model.backbone=efficientnet_lite0", "model.pretrained=true", "speed.compile=true"],
    ),
)


def pipeline_checks(devices: int, work: Path) -> list[str]:
    """train.py on toy images: one GPU, two (DDP) when there are two, and Lite0 compiled; on a GPU the
    shift report runs at the end of each (eval.shifts=auto), so its CUDA path is checked too."""
    from helpers import scalar_tags
    from toy_data import make_image_tree

    root = make_image_tree(work / "toy", size=64)
    lines = []
    for i, (label, n, extra) in enumerate(PIPELINE_RUNS):
        if n > devices:
            lines.append(f"- train.py on {n} GPUs ({label}): skipped, {devices} GPU(s) visible")
            continue
        out = work / f"out{i}"
        args = [
            "stage=finetune",
            f"data.root={root}",
            "data.source=none",
            f"out_dir={out}",
            *extra,
            "data.image_size=64",
            "data.batch_size=8",
            "finetune.warmup_epochs=1",
            "trainer.max_epochs=3",
            f"trainer.devices={n}",
            "trainer.enable_progress_bar=false",
        ]
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True)
        if proc.returncode != 0:
            lines.append(f"- train.py on {n} GPU(s) ({label}): FAILED (exit {proc.returncode}): {proc.stderr[-800:]!r}")
            continue
        run = next(out.glob("finetune_*/*"))
        metrics = json.loads((run / "metrics.json").read_text())
        shift = metrics.get("shift") or {}
        line = (
            f"- train.py stage=finetune on {n} GPU(s) ({label}), precision auto: {metrics['epochs']} epochs in "
            f"{time.perf_counter() - started:.0f} s, val acc {metrics['val']['acc']:.3f}, "
            f"test acc {metrics['test']['acc']:.3f}, shift report {len(shift.get('shifts', {}))} rows, "
            f"shift acc {shift.get('shift_acc')}, peak GPU memory {metrics.get('peak_cuda_mb')} MB"
        )
        if n > 1:
            differing = [v for _, v in scalar_tags(run).get("ddp/differing_tensors", [])]
            ok = bool(differing) and max(differing) == 0
            line += f"; replica check per epoch {differing} ({'OK' if ok else 'REPLICAS DIFFER'})"
        lines.append(line)
        print(line, file=sys.stderr, flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per configuration")
    parser.add_argument("--quick", action="store_true", help="fp32 and bf16+channels_last only, 1 s each")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False)")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
    started = time.perf_counter()
    variants = (VARIANTS[0], VARIANTS[3]) if args.quick else VARIANTS
    with tempfile.TemporaryDirectory() as work:  # first: whether the project runs matters more than how fast
        checks = pipeline_checks(torch.cuda.device_count(), Path(work))
    rows = speed_rows(device, 1.0 if args.quick else args.seconds, variants)
    name = torch.cuda.get_device_name(0)
    print(f"### {name} x {torch.cuda.device_count()}, torch {torch.__version__}, batch 32, random weights\n")
    print("| backbone | method | precision | channels_last | compile | images/s | peak memory (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rate, memory = (f"{r['images_per_s']:.0f}", f"{r['peak_mb']:.0f}") if "error" not in r else (r["error"], "")
        print(
            f"| {r['backbone']} | {r['method']} | {r['precision']} | {'on' if r['channels_last'] else 'off'} "
            f"| {'on' if r['compile'] else 'off'} | {rate} | {memory} |"
        )
    print()
    print("\n".join(checks))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
