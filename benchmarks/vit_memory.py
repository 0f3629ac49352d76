#!/usr/bin/env python
"""Training-step speed and peak memory of a ViT as this project cuts it (random weights: no
pretrained ViT can be had offline): every block trained (a full fine-tune), with and without
``model.grad_checkpointing``, and every block's LoRA adapters (``finetune.method=lora``), each in a
fresh process (peak resident memory is per process), and on a CUDA GPU when there is one (its peak
allocated memory). Prints a table:

    python benchmarks/vit_memory.py                                  # timm:vit_small_patch16_224, batch 16
    python benchmarks/vit_memory.py --model vit_base_patch16_224 --batch 32 --steps 20
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("plain", "checkpointing", "lora")
sys.path.insert(0, str(ROOT))


def measure(model_name: str, batch: int, steps: int, kind: str) -> dict:
    """In this process: ``steps`` timed training steps after two untimed ones."""
    import torch
    from lightning.pytorch import seed_everything

    from pipeline.config.load import load_config, plan_from_config
    from pipeline.runner.build import build_model

    args = [
        "stage=finetune", f"model.backbone=timm:{model_name}", "model.pretrained=false", "data.image_size=224",
        f"model.grad_checkpointing={str(kind == 'checkpointing').lower()}", "finetune.warmup_epochs=0",
        "trainer.max_epochs=1", *(["finetune.method=lora"] if kind == "lora" else []),
    ]
    cfg = load_config(args)
    seed_everything(0)
    model = build_model(cfg, ["a", "b"])
    n_blocks = len(model.backbone.blocks)
    model.set_plan(plan_from_config(cfg))
    model.set_trainable_blocks(tuple(range(n_blocks)))  # every block trains (with LoRA: its adapters)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 2, (batch,), device=device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model._loss(model(images), labels).backward()
        optimizer.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "device": device.type,
        "images_per_s": batch * steps / seconds,
        "peak_mb": peak,
        "trainable": trainable,
        "blocks": n_blocks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.batch, args.steps, args.one)))
        return
    rows = {}
    for kind in KINDS:
        command = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch)]
        done = subprocess.run([*command, "--steps", str(args.steps), "--one", kind], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        rows[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    device = rows["plain"]["device"]
    memory = "peak GPU memory allocated (MB)" if device == "cuda" else "peak RSS (MB)"
    print(f"| timm:{args.model}, 224 px, batch {args.batch}, {device} | images/s | {memory} | trainable params |")
    print("|---|---|---|---|")
    for kind, row in rows.items():
        name = {"plain": "full fine-tune", "checkpointing": "full fine-tune, model.grad_checkpointing=true"}.get(
            kind, "finetune.method=lora (rank 8, every block's qkv/proj/fc1/fc2)"
        )
        print(f"| {name} | {row['images_per_s']:.1f} | {row['peak_mb']:.0f} | {row['trainable']:,} |")


if __name__ == "__main__":
    main()
