#!/usr/bin/env python
"""The documentation's pictures, drawn from real run folders (nothing else from a run is kept).

    python docs/make_pictures.py --train-run runs/finetune_efficientnet_lite0_cats_and_dogs_small/<time> \\
        --shift-run runs/test_efficientnet_lite0_cats_and_dogs_small/<time> [--robust-shift-run ...] [--out docs/img]

Writes small PNGs into ``--out`` (default ``docs/img``):

- ``plan.png``: the training run's plan (``config.yaml``'s ``plan:``, else re-derived from the config),
  drawn by ``lightning_modules.plan_figure.plan_figure``, as every run draws it;
- ``learning_curves.png``: training and validation accuracy and loss per epoch, read from the run's
  TensorBoard event files, with the plan's phase boundaries;
- ``reliability.png``: a copy of the run's ``reliability_test.png``;
- ``shift.png`` (and ``shift_robust.png``): copies of the shift report's ``shift.png``;
- with ``--notebook``: ``show_batch.png``, ``top_losses.png`` and ``confusion_matrix.png``, the notebook
  flow's figures on the run's own photos and best model;
- ``tensorboard.png``: TensorBoard's Custom Scalars tab on the training run (its cards only), taken in
  headless Chromium (``apt-get install chromium-headless-shell`` or ``chromium``); skipped, with a line
  saying so, when no browser is installed or ``--no-screenshot`` is given.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "chrome")
# The screenshot's window, and the part kept: the Custom Scalars cards (left, top, right, bottom). The
# settings column and the empty right margin are cut, so that the picture, shown at page width, keeps
# about its own size and its axis labels stay readable.
WINDOW = (1280, 860)
CARDS = (330, 74, 1056, 840)
TRAIN, VAL = (40, 80, 200), (220, 60, 60)


def run_plan(run_dir: Path):
    """The run's ``Plan``: the ``plan:`` that ``config.yaml`` records, else the one its config builds."""
    from omegaconf import OmegaConf

    from lightning_modules.schedule import Plan

    cfg = OmegaConf.load(run_dir / "config.yaml")
    if "plan" in cfg:
        return Plan.from_dict(OmegaConf.to_container(cfg.plan))
    from pipeline.config.load import plan_from_config

    return plan_from_config(cfg)


def epoch_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """``{tag: {epoch: value}}`` for the per-epoch train/val accuracy and loss in the run's event
    files (the epoch is TensorBoard's ``epoch`` scalar at the same step; the final evaluation's
    validation, logged without a training epoch, is left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {"train/acc": "train/acc", "val/acc": "val/acc", "train/loss_epoch": "train/loss", "val/loss": "val/loss"}
    out: dict[str, dict[int, float]] = {name: {} for name in tags.values()}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 1, "tensors": 1})
        acc.Reload()
        available = set(acc.Tags()["scalars"])
        if "train/acc" not in available or "epoch" not in available:
            continue
        epoch_at = {e.step: int(e.value) for e in acc.Scalars("epoch")}
        train_steps = {e.step for e in acc.Scalars("train/acc")}
        for tag, name in tags.items():
            if tag in available:
                for e in acc.Scalars(tag):
                    if e.step in train_steps and e.step in epoch_at:
                        out[name][epoch_at[e.step]] = float(e.value)
    return out


def learning_curves(scalars: dict[str, dict[int, float]], phase_starts: list[int], title: str) -> Image.Image:
    """Two panels (accuracy, loss), training and validation per epoch, drawn with PIL as the
    project's own figures; dotted lines where a phase of the plan starts."""
    from lightning_modules.figures import _font

    font = _font()
    panel_w, height, left, top, bottom, gap = 330, 300, 56, 48, 36, 20
    canvas = Image.new("RGB", (2 * panel_w + gap, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 6), title, fill=(0, 0, 0), font=font)
    draw.text((left, 22), "training", fill=TRAIN, font=font)
    draw.text((left + 70, 22), "validation", fill=VAL, font=font)
    epochs = sorted({e for series in scalars.values() for e in series})
    if not epochs:
        return canvas
    # the value after epoch e (0-based) is drawn at x = e + 1: "after 1 epoch", ...
    x_lo, x_hi = 0.0, float(epochs[-1] + 1)
    for k, (metric, label) in enumerate((("acc", "accuracy"), ("loss", "loss"))):
        x0 = k * (panel_w + gap) + left
        plot_w, plot_h = panel_w - left - 10, height - top - bottom
        series = {name: scalars.get(f"{name}/{metric}", {}) for name in ("train", "val")}
        values = [v for s in series.values() for v in s.values()]
        y_lo, y_hi = min(values), max(values)
        pad = (y_hi - y_lo) * 0.08 or 0.01
        y_lo, y_hi = y_lo - pad, y_hi + pad

        def at(x: float, y: float, x0=x0, plot_w=plot_w, plot_h=plot_h, y_lo=y_lo, y_hi=y_hi) -> tuple[float, float]:
            return x0 + (x - x_lo) / (x_hi - x_lo) * plot_w, top + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h

        draw.rectangle([x0, top, x0 + plot_w, top + plot_h], outline=(0, 0, 0))
        for start in phase_starts:
            if 0 < start < x_hi:
                x, _ = at(start, y_lo)
                for y in range(top, top + plot_h, 6):
                    draw.line([x, y, x, y + 2], fill=(150, 150, 150))
        for name, colour in (("train", TRAIN), ("val", VAL)):
            points = [at(e + 1, v) for e, v in sorted(series[name].items())]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        for e in range(int(x_lo), int(x_hi) + 1):
            x, _ = at(e, y_lo)
            draw.line([x, top + plot_h, x, top + plot_h + 4], fill=(0, 0, 0))
            draw.text((x - 3, top + plot_h + 6), str(e), fill=(0, 0, 0), font=font)
        draw.text((x0 - 50, top), f"{y_hi:.3f}", fill=(0, 0, 0), font=font)
        draw.text((x0 - 50, top + plot_h - 12), f"{y_lo:.3f}", fill=(0, 0, 0), font=font)
        draw.text((x0 + plot_w // 2 - 40, height - 16), f"{label} / epoch", fill=(0, 0, 0), font=font)
    return canvas


def save_small(image: Image.Image, path: Path, colours: int | None = None) -> None:
    """A PNG as small as it stays readable (``colours``: a palette of that many, for screenshots)."""
    if colours:
        image = image.convert("RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
    image.save(path, format="PNG", optimize=True)


def notebook_pictures(run: Path, out: Path) -> None:
    """``show_batch.png``, ``top_losses.png`` and ``confusion_matrix.png``: the notebook flow
    (``pipeline.notebook``) on the run's data (its training augmentation; its validation folder) and its
    best checkpoint, as ``docs/example.ipynb`` draws them on toy data."""
    import io
    import json

    from omegaconf import OmegaConf

    from pipeline import load_model
    from pipeline.notebook import confusion_matrix, show_batch, top_losses

    cfg = OmegaConf.load(run / "config.yaml")
    model = load_model(json.loads((run / "metrics.json").read_text())["best_ckpt"])
    validation = Path(cfg.data.root) / "validation"
    figures = {
        "show_batch.png": show_batch(8, data_root=cfg.data.root, model_backbone=cfg.model.backbone,
                                     data_augment=cfg.data.augment, data_image_size=cfg.data.image_size),
        "top_losses.png": top_losses(model, validation, k=8),
        "confusion_matrix.png": confusion_matrix(model, validation),
    }  # fmt: skip
    for name, figure in figures.items():
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=72)
        save_small(Image.open(buffer), out / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensorboard_screenshot(run_dir: Path, out: Path, browser: str, timeout: float = 90.0) -> None:
    """TensorBoard (Custom Scalars: the seed's train-vs-validation plots, the learning rates) on a
    copy of the run's event files, photographed by a headless Chromium."""
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp) / "logs" / run_dir.parent.name
        logs.mkdir(parents=True)
        for events in run_dir.glob("events.out.tfevents.*"):
            shutil.copy2(events, logs / events.name)
        port = free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                "--logdir",
                str(logs.parent),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as reply:
                        if run_dir.parent.name in reply.read().decode():
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("TensorBoard did not start")
                time.sleep(1)
            shot = Path(tmp) / "shot.png"
            subprocess.run(
                [
                    browser,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    f"--window-size={WINDOW[0]},{WINDOW[1]}",
                    "--virtual-time-budget=20000",
                    f"--screenshot={shot}",
                    f"http://127.0.0.1:{port}/#custom_scalars",
                ],
                check=True,
                capture_output=True,
                timeout=timeout,
            )
            save_small(Image.open(shot).crop(CARDS), out, colours=96)
        finally:
            server.terminate()
            server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-run", type=Path, required=True, help="a training run folder (config.yaml, events)")
    parser.add_argument("--shift-run", type=Path, help="a run folder with shift.png (e.g. stage=test eval.shifts=all)")
    parser.add_argument("--robust-shift-run", type=Path, help="a second shift report (data.augment=robust)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--no-screenshot", action="store_true", help="skip the TensorBoard screenshot")
    parser.add_argument(
        "--notebook", action="store_true", help="also the notebook flow's figures, from the run's data and best model"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    run = args.train_run

    plan = run_plan(run)
    from lightning_modules.plan_figure import plan_figure

    save_small(plan_figure(plan), args.out / "plan.png")
    scalars = epoch_scalars(run)
    title = f"{run.parent.name}: per epoch (dotted: a phase starts)"
    save_small(learning_curves(scalars, [p.start for p in plan.phases], title), args.out / "learning_curves.png")
    copies = {"reliability.png": run / "reliability_test.png"}
    if args.shift_run:
        copies["shift.png"] = args.shift_run / "shift.png"
    if args.robust_shift_run:
        copies["shift_robust.png"] = args.robust_shift_run / "shift.png"
    for name, source in copies.items():
        save_small(Image.open(source), args.out / name)

    if args.notebook:
        notebook_pictures(run, args.out)
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if args.no_screenshot:
        print("tensorboard.png: skipped (--no-screenshot)")
    elif browser is None:
        print("tensorboard.png: skipped (no Chromium; apt-get install chromium-headless-shell)")
    else:
        tensorboard_screenshot(run, args.out / "tensorboard.png", browser)
    total = 0
    for png in sorted(args.out.glob("*.png")):
        total += png.stat().st_size
        print(f"{png}: {png.stat().st_size / 1024:.0f} KB")
    print(f"total {total / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
