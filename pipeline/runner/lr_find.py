"""``stage=lr_find``: Lightning's learning-rate range test on the head phase.

The backbone is frozen, as in a fine-tune's head warm-up, and the rate of every optimizer group
moves together from ``lr_find.min_lr`` to ``lr_find.max_lr`` over at most one epoch of training
steps; the suggestion (Lightning's steepest descent of the smoothed loss) is for ``optim.lr``, the
head's rate, which the plan's ``finetune.backbone_lr_ratio`` then scales for the backbone.
"""

from __future__ import annotations

import math
import time
from typing import Any

from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from core.errors import ConfigError
from lightning_modules.figures import as_tensor, line_plot, png_bytes
from lightning_modules.tensorboard_views import tensorboard_writer
from pipeline.config.load import plan_from_config
from pipeline.runner.build import Build, build_stage
from pipeline.runner.trainer_factory import intended_warnings, make_trainer


def run_lr_find_stage(cfg: DictConfig, run_name: str | None) -> dict[str, Any]:
    """``stage=lr_find``'s runner (``pipeline/registry.py``)."""
    return run_lr_find(cfg, build_stage(cfg, run_name))


def run_lr_find(cfg: DictConfig, build: Build) -> dict[str, Any]:
    started = time.time()
    model, data, run = build.model, build.datamodule, build.run
    plan = plan_from_config(cfg)
    model.set_plan(plan)
    model.set_trainable_top(0)
    data.setup("fit")
    per_epoch = math.ceil(len(data.datasets["train"]) / data.batch_size)
    steps = min(cfg.lr_find.num_steps, per_epoch)
    if steps < 5:
        raise ConfigError(f"stage=lr_find needs at least 5 training batches, the training split gives {per_epoch}")
    # default_root_dir: where Lightning keeps its temporary checkpoint of the untouched model
    trainer = make_trainer(
        cfg, run.path, [], model=model, max_epochs=1, enable_checkpointing=False, default_root_dir=str(run)
    )
    with intended_warnings():
        finder = Tuner(trainer).lr_find(
            model,
            datamodule=data,
            min_lr=cfg.lr_find.min_lr,
            max_lr=cfg.lr_find.max_lr,
            num_training=steps,
            early_stop_threshold=4.0,
            update_attr=False,
        )
    lrs, losses = list(finder.results["lr"]), list(finder.results["loss"])
    # Lightning skips the first 10 points (its smoothed loss starts from the first batches' values)
    # and the last; with few steps, fewer. The plot shows what the suggestion was chosen from.
    skip = min(10, max(1, len(lrs) // 5))
    suggestion = finder.suggestion(skip_begin=skip, skip_end=1)
    result = {
        "stage": "lr_find",
        "backbone": cfg.model.backbone,
        "run_dir": str(run),
        "steps": len(lrs),
        "min_lr": cfg.lr_find.min_lr,
        "max_lr": cfg.lr_find.max_lr,
        "suggested_lr": suggestion,
        "lr": lrs,
        "loss": losses,
        "wall_time_s": round(time.time() - started, 2),
    }
    if trainer.is_global_zero:
        title = f"lr_find: {cfg.model.backbone}, head phase, {len(lrs)} steps"
        shown = slice(skip, len(lrs) - 1)
        image = line_plot(lrs[shown], losses[shown], title, "learning rate (log scale)", "smoothed loss", suggestion)
        run.write_bytes("lr_find.png", png_bytes(image))
        run.write_json("lr_find.json", result)
        writer = tensorboard_writer(trainer)
        if writer is not None:
            writer.add_image("lr_find/plot", as_tensor(image), 0)
            for i, (lr, loss) in enumerate(zip(lrs, losses)):
                writer.add_scalar("lr_find/loss", loss, i)
                writer.add_scalar("lr_find/lr", lr, i)
            writer.flush()
    if suggestion is None:
        rank_zero_info("lr_find: no suggestion (the loss did not fall over the range); see lr_find.png")
    else:
        print(f"suggested optim.lr={suggestion:.3g}  (plot: {run / 'lr_find.png'})")
    return result
