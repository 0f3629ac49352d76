#!/usr/bin/env python
"""The seed's three methods, measured: accuracy, time, throughput, memory; plus the speed checks.

    python benchmarks/seed_protocol.py                      # Lite0 on ../shared/data, short schedule
    python benchmarks/seed_protocol.py --full               # the seed's 30 / 30 / 100 epochs
    python benchmarks/seed_protocol.py --backbone vgg16 --image-size 150 --random-weights

Prints one markdown table and writes it (and JSON) to --out. Each method runs ``train.py`` in its
own process (so peak memory is per method); ``finetune`` starts from the best ``frozen`` checkpoint
as in the seed. Then, in this process: the framework overhead (the project's ``frozen`` training
loop vs a plain PyTorch loop over the same model, batches, transforms and threads) and the input
pipeline (loader throughput with and without the decoded-image cache).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHORT = {"features": 30, "frozen": 2, "finetune": 2}
FULL = {"features": 30, "frozen": 30, "finetune": 100}


def run_method(stage: str, epochs: int, common: list[str], extra: list[str]) -> dict:
    args = [f"stage={stage}", f"trainer.max_epochs={epochs}", *common, *extra]
    started = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((newest_run(stage, common) / "metrics.json").read_text())
    metrics["process_wall_s"] = round(time.time() - started, 1)
    return metrics


def newest_run(stage: str, common: list[str]) -> Path:
    """The newest run folder of ``stage`` for these arguments (their ``out_dir``, backbone and data;
    also an older version's folder, whose name had no data set)."""
    from pipeline.config.load import load_config
    from pipeline.runner.run_dir import group_dir

    cfg = load_config([f"stage={stage}", *common])
    groups = [g for g in (group_dir(cfg), group_dir(cfg, data_set=False)) if g.is_dir()]
    return max((p for g in groups for p in g.iterdir() if p.is_dir()), key=lambda p: p.name)


def images_per_second(stamps: list[float], sizes: list[int]) -> float:
    """Images of the batches timed, over their time: ``stamps[0]`` is when the first timed batch
    started (the end of the untimed warm-up), ``stamps[i]`` when timed batch ``i`` ended, so
    ``len(stamps) == len(sizes) + 1``: n batches' images over n batches' time."""
    if len(stamps) != len(sizes) + 1 or not sizes:
        raise ValueError(f"need one more time stamp than batches, got {len(stamps)} and {len(sizes)}")
    return sum(sizes) / (stamps[-1] - stamps[0])


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


class BatchClock(Callback):
    """The time at the end of every training batch, and its size."""

    def __init__(self, sync=lambda: None):
        self.sync, self.stamps, self.sizes = sync, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.sync()
        self.stamps.append(time.perf_counter())
        self.sizes.append(int(batch[1].shape[0]))


def overhead_and_loader(
    backbone: str, data: str, image_size: int, batch: int, device: str, pretrained: bool, cache_dir: Path, batches: int
) -> dict:
    """Plain PyTorch vs the project's frozen stage (same work), and loader throughput."""
    import torch
    from lightning.pytorch import seed_everything

    from datamodules.data_index import scan_splits
    from datamodules.image_folder import ImageFolderDataModule
    from lightning_modules.classifier import make_optimizer
    from lightning_modules.freeze_schedule import ApplyPlan
    from lightning_modules.schedule import param_groups
    from pipeline.config.load import load_config, plan_from_config
    from pipeline.runner.build import build_model
    from pipeline.runner.trainer_factory import apply_speed_settings, make_trainer

    cfg = load_config(
        [
            "stage=frozen",
            f"model.backbone={backbone}",
            f"data.root={data}",
            f"data.image_size={image_size}",
            f"data.batch_size={batch}",
            f"model.pretrained={str(pretrained).lower()}",
            f"out_dir={cache_dir / 'overhead_runs'}",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "log.images_every_n_epochs=0",
            f"trainer.accelerator={'gpu' if device == 'cuda' else device}",
            "speed.channels_last=true",
        ]
    )
    plan = plan_from_config(cfg)
    apply_speed_settings(cfg)
    seed_everything(0)
    index = scan_splits(data, cache_dir=cache_dir)  # the decode check, remembered for the next run
    model = build_model(cfg, index.classes, plan)

    def datamodule(decoded: bool) -> ImageFolderDataModule:
        dm = ImageFolderDataModule(
            index,
            image_size,
            batch,
            None,
            cfg.data.augment,
            model.backbone.mean,
            model.backbone.std,
            pin_memory=device == "cuda",
            seed=0,
            decoded_cache_dir=cache_dir if decoded else None,
        )
        dm.prepare_data()
        dm.setup("fit")
        return dm

    def loader_rate(dm: ImageFolderDataModule, n: int) -> float:
        loader = dm.loader(dm.datasets["train"], train=True)
        it = iter(loader)
        next(it)  # workers started
        stamps, sizes = [time.perf_counter()], []
        for _, (_, target) in zip(range(n), it):  # n batches, or the rest of the epoch
            sizes.append(target.shape[0])
            stamps.append(time.perf_counter())
        return images_per_second(stamps, sizes)

    plain_dm = datamodule(decoded=False)
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def preloaded(n: int) -> list:
        """``n + 1`` training batches read once and kept in memory: the overhead is then timed without
        the loader, whose workers share the cores with the model and add more jitter (about 15% between
        runs on 2 cores) than the difference being measured."""
        loader = plain_dm.loader(plain_dm.datasets["train"], train=True)
        return [batch for _, batch in zip(range(n + 1), loader)]

    def plain_loop(n: int, batches: list | None = None) -> float:
        """A plain PyTorch loop: one untimed warm-up step, then ``n`` timed steps (loading included
        unless ``batches`` are given)."""
        model.to(dev).set_trainable_top(0)
        model.train()
        groups = param_groups(model.head, model.backbone.blocks, plan, cfg.optim.weight_decay)
        optimizer = make_optimizer(cfg.optim.name, groups, cfg.optim.weight_decay)
        source = batches if batches is not None else plain_dm.loader(plain_dm.datasets["train"], train=True)
        stamps, sizes = [], []
        for i, (images, target) in enumerate(source):
            images, target = images.to(dev, non_blocking=True), target.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss = model._loss(model(images), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync()
            stamps.append(time.perf_counter())
            sizes.append(target.shape[0])
            if i == n:
                break
        return images_per_second(stamps, sizes[1:])

    def lightning_loop(n: int, batches: list | None = None) -> float:
        """The project's frozen stage for ``n + 1`` steps, timed like the plain loop (first step untimed)."""
        clock = BatchClock(sync)
        run_dir = cache_dir / "overhead_runs" / "frozen_bench" / str(time.time_ns())
        trainer = make_trainer(
            cfg,
            run_dir,
            [ApplyPlan(plan, 0), clock],
            model=model,
            max_epochs=1,
            limit_train_batches=n + 1,
            limit_val_batches=0,
            enable_checkpointing=True,
        )
        if batches is None:
            trainer.fit(model, datamodule=plain_dm)
        else:  # batch_size=None: the DataLoader hands each stored batch over as it is
            trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        return images_per_second(clock.stamps, clock.sizes[1:])

    def interleaved(batches: list | None) -> tuple[list[float], list[float]]:
        """Three runs of each loop after an untimed short run of both (allocator, caches), alternated
        and in turn order (plain first, then the framework first, ...) so that drifts and whatever
        favours the second of a pair hit both alike."""
        plain_loop(4, batches)
        lightning_loop(4, batches)
        plain, framework = [], []
        for i in range(3):
            if i % 2 == 0:
                plain.append(plain_loop(n_batches, batches))
                framework.append(lightning_loop(n_batches, batches))
            else:
                framework.append(lightning_loop(n_batches, batches))
                plain.append(plain_loop(n_batches, batches))
            where = "pre-loaded batches" if batches is not None else "with the loader"
            print(f"{where}: plain {plain[-1]:.1f} img/s, framework {framework[-1]:.1f} img/s", file=sys.stderr)
        return plain, framework

    n_batches = min(batches, -(-len(plain_dm.datasets["train"]) // batch) - 1)  # n, or one epoch less warm-up
    plain, framework = interleaved(preloaded(n_batches))
    plain_io, framework_io = interleaved(None)
    raw_loader = median([loader_rate(plain_dm, batches) for _ in range(3)])
    build_started = time.perf_counter()
    cached_dm = datamodule(decoded=True)
    cache_build_s = time.perf_counter() - build_started
    cached_loader = median([loader_rate(cached_dm, batches) for _ in range(3)])
    plain_rate, framework_rate = median(plain), median(framework)
    plain_io_rate, framework_io_rate = median(plain_io), median(framework_io)
    return {
        "plain_images_per_s": round(plain_rate, 1),
        "framework_images_per_s": round(framework_rate, 1),
        "framework_vs_plain": round(framework_rate / plain_rate, 3),
        "plain_runs": [round(r, 1) for r in plain],
        "framework_runs": [round(r, 1) for r in framework],
        "with_loader_plain_images_per_s": round(plain_io_rate, 1),
        "with_loader_framework_images_per_s": round(framework_io_rate, 1),
        "with_loader_framework_vs_plain": round(framework_io_rate / plain_io_rate, 3),
        "with_loader_plain_runs": [round(r, 1) for r in plain_io],
        "with_loader_framework_runs": [round(r, 1) for r in framework_io],
        "loader_images_per_s": round(raw_loader, 1),
        "cached_loader_images_per_s": round(cached_loader, 1),
        "cache_speedup": round(cached_loader / raw_loader, 2),
        "decoded_cache_build_s": round(cache_build_s, 1),
        "batches": n_batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cats_and_dogs_small"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=None, help="default: the backbone config's")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--random-weights", action="store_true", help="model.pretrained=false (speed only)")
    parser.add_argument("--full", action="store_true", help="the seed's 30 / 30 / 100 epochs")
    parser.add_argument("--epochs", type=int, nargs=3, default=None, metavar=("FEATURES", "FROZEN", "FINETUNE"))
    parser.add_argument("--overhead-batches", type=int, default=100)
    parser.add_argument("--skip-methods", action="store_true", help="only the overhead and loader checks")
    parser.add_argument("--methods-from", default=None, help="reuse the method runs of an earlier work folder")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if not Path(args.data, "train").is_dir():
        raise SystemExit(f"no data at {args.data} (expected train/, validation/, test/); pass --data")

    from pipeline.config.load import load_config

    preset = load_config([f"model.backbone={args.backbone}", "stage=frozen"])
    image_size = args.image_size or preset.data.image_size
    batch = args.batch_size or preset.data.batch_size
    out = Path(args.out)
    work = out / f"work-{args.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"
    epochs = dict(zip(SHORT, args.epochs)) if args.epochs else (FULL if args.full else SHORT)
    accelerator = {"auto": "auto", "cpu": "cpu", "cuda": "gpu"}[args.device]
    common = [
        f"model.backbone={args.backbone}",
        f"data.root={args.data}",
        f"data.image_size={image_size}",
        f"data.batch_size={batch}",
        f"out_dir={work / 'runs'}",
        f"model.pretrained={str(not args.random_weights).lower()}",
        f"trainer.accelerator={accelerator}",
        "trainer.enable_progress_bar=false",
    ]
    rows = []
    if args.methods_from:
        work = Path(args.methods_from)
        rows = []
        for name, stage in (
            ("1. features", "features"),
            ("2. frozen + augmentation", "frozen"),
            ("3. fine-tune", "finetune"),
        ):
            earlier = [a for a in common if not a.startswith("out_dir=")] + [f"out_dir={work / 'runs'}"]
            run = newest_run(stage, earlier)
            rows.append((name, json.loads((run / "metrics.json").read_text())))
    elif not args.skip_methods:
        features = run_method("features", epochs["features"], common, [])
        frozen = run_method("frozen", epochs["frozen"], common, [])
        finetune = run_method(
            "finetune",
            epochs["finetune"],
            common,
            [f"finetune.init_ckpt={frozen['best_ckpt']}", "finetune.warmup_epochs=0"],
        )
        rows = [("1. features", features), ("2. frozen + augmentation", frozen), ("3. fine-tune", finetune)]
    checks = overhead_and_loader(
        args.backbone,
        args.data,
        image_size,
        batch,
        args.device,
        not args.random_weights,
        work / "cache",
        args.overhead_batches,
    )

    lines = [
        f"### {args.backbone}, {image_size} px, batch {batch}, device {args.device}, "
        f"epochs {epochs['features']}/{epochs['frozen']}/{epochs['finetune']}",
        "",
        "| method | val acc | test acc | epochs | wall time (s) | train images/s | peak memory (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in rows:
        memory = m.get("peak_cuda_mb") or m.get("peak_rss_mb")
        lines.append(
            f"| {name} | {m['val']['acc']:.4f} | {m['test']['acc']:.4f} | {m['epochs']} | "
            f"{m['wall_time_s']:.0f} | {m['train_images_per_s']} | {memory} |"
        )
    if rows:
        head_epoch = sorted(rows[0][1]["train_epoch_seconds"])[len(rows[0][1]["train_epoch_seconds"]) // 2]
        frozen_epoch = sorted(rows[1][1]["train_epoch_seconds"])[len(rows[1][1]["train_epoch_seconds"]) // 2]
        checks["cached_head_epoch_s"] = head_epoch
        checks["frozen_epoch_s"] = frozen_epoch
        checks["head_epoch_vs_frozen_epoch"] = round(head_epoch / frozen_epoch, 5)
        lines += [
            "",
            f"- feature cache: one head epoch {head_epoch:.3f} s vs one frozen epoch {frozen_epoch:.1f} s "
            f"= 1/{frozen_epoch / head_epoch:.0f} (target: at most 1/50)",
        ]
    lines += [
        f"- framework overhead: project `frozen` loop {checks['framework_images_per_s']} img/s vs plain PyTorch "
        f"{checks['plain_images_per_s']} img/s = {checks['framework_vs_plain']:.3f} (medians of 3 runs of "
        f"{checks['batches']} batches on pre-loaded batches; target: at least 0.97); with the loader "
        f"{checks['with_loader_framework_images_per_s']} vs {checks['with_loader_plain_images_per_s']} img/s = "
        f"{checks['with_loader_framework_vs_plain']:.3f} (runs {checks['with_loader_framework_runs']} vs "
        f"{checks['with_loader_plain_runs']})",
        f"- input pipeline: loader alone {checks['loader_images_per_s']} img/s, with the decoded-image cache "
        f"{checks['cached_loader_images_per_s']} img/s = {checks['cache_speedup']}x (target: at least 4x; "
        f"cache built in {checks['decoded_cache_build_s']} s); the model consumes {checks['plain_images_per_s']} img/s",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.backbone}-{image_size}px-{'full' if args.full else 'short'}"
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps({"methods": dict(rows), "checks": checks}, indent=2))
    print(f"written to {out / stem}.md and .json")


if __name__ == "__main__":
    main()
