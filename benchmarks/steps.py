"""The work of one batch of each of the seed's three methods, on synthetic data, for speed benchmarks.

``features``: the backbone's forward pass (what the feature cache runs once per image);
``frozen``: a training step with the backbone frozen (forward through everything, backward
through the head); ``finetune``: a training step with the top blocks of the backbone's
``stage=finetune`` preset unfrozen. The model, its trainable set and the optimizer groups come
from the project (``build_model``, the plan), so the benchmarks measure the project's own work.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

METHODS = ("features", "frozen", "finetune")


@dataclass
class Step:
    run: Callable[[], None]  # one batch
    batch: int


def build(backbone: str, image_size: int, pretrained: bool = False, channels_last: bool = True):
    """A TransferClassifier for ``backbone`` (random weights by default) and its fine-tune plan."""
    from pipeline.config.load import load_config, plan_from_config
    from pipeline.runner.build import build_model

    cfg = load_config(
        [
            "stage=finetune",
            f"model.backbone={backbone}",
            f"data.image_size={image_size}",
            f"model.pretrained={str(pretrained).lower()}",
            f"speed.channels_last={str(channels_last).lower()}",
        ]
    )
    plan = plan_from_config(cfg)
    return build_model(cfg, ["cats", "dogs"], plan), plan, cfg


def make_step(model, plan, cfg, method: str, batch: int, device: torch.device, precision: str = "fp32") -> Step:
    """One batch of ``method`` on ``device`` (``precision``: fp32 or bf16 autocast)."""
    from lightning_modules.classifier import make_optimizer
    from lightning_modules.schedule import param_groups

    size = cfg.data.image_size
    images = torch.randn(batch, 3, size, size, device=device)
    if model.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 2, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    model.to(device)
    if method == "features":
        model.eval()

        def run() -> None:
            with torch.no_grad(), autocast:
                model.forward_features(images)

        return Step(run, batch)
    top = 0 if method == "frozen" else max(p.top_blocks for p in plan.phases)
    model.set_trainable_top(top)
    model.train()
    groups = param_groups(model.head, model.backbone.blocks, plan, cfg.optim.weight_decay)
    optimizer = make_optimizer(cfg.optim.name, groups, cfg.optim.weight_decay)

    def run() -> None:
        with autocast:
            loss = model._loss(model(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return Step(run, batch)


def images_per_second(step: Step, device: torch.device, warmup: int = 2, seconds: float = 3.0) -> float:
    """Steps run for about ``seconds`` after ``warmup`` untimed ones; images over their time."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step.run()
    sync()
    started, steps = time.perf_counter(), 0
    while True:
        step.run()
        steps += 1
        sync()
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and steps >= 3:
            return steps * step.batch / elapsed


def flops_per_image(model, plan, method: str, image_size: int) -> float:
    """Floating-point operations of one image of ``method``: the forward pass counted by torch's
    FlopCounterMode block by block, and backward as twice the forward of what it passes through
    (the usual convention; FlopCounterMode's own backward count is far off for depthwise
    convolutions). ``frozen`` backpropagates through the head only, ``finetune`` also through the
    plan's top blocks."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.randn(1, 3, image_size, image_size)
    blocks = []
    with torch.no_grad():
        for block in model.backbone.blocks:
            with FlopCounterMode(display=False) as counter:
                x = block(x)
            blocks.append(counter.get_total_flops())
        with FlopCounterMode(display=False) as counter:
            model.head(x)
        head = counter.get_total_flops()
    model.train(was_training)
    forward = sum(blocks) + head
    if method == "features":
        return sum(blocks)
    top = 0 if method == "frozen" else max(p.top_blocks for p in plan.phases)
    return forward + 2 * (head + sum(blocks[len(blocks) - top :]))
