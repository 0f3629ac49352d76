"""stage=all: the seed's three methods in order on one data set, and a comparison table."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from core.errors import ConfigError
from pipeline.config.load import load_config, parse_overrides, plan_from_config, to_yaml
from pipeline.registry import stage_spec
from pipeline.runner.evaluation import paired_mcnemar, read_correct
from pipeline.runner.run_dir import is_rank_zero, resolve_all_run
from pipeline.runner.stages import run_stage

METHODS = [
    ("features", "1. feature extraction (cached features, head only)"),
    ("frozen", "2. frozen base + augmentation"),
    ("finetune", "3. fine-tuning the top blocks (from the best frozen checkpoint)"),
]


def _stage_argv(stage: str, argv: list[str], epochs: int | None) -> list[str]:
    """The command line of one method. Epochs: ``all.epochs``, else ``trainer.max_epochs`` if given
    (the same for every method), else the method's preset. Fine-tuning continues from the frozen
    run, so unless the command line sets its schedule it runs the fine-tune preset's unfreezing
    without the head warm-up (and, with fewer epochs, only the milestones that fall inside them)."""
    cli = parse_overrides(argv)
    extra = [f"stage={stage}"]
    if epochs is not None:
        extra.append(f"trainer.max_epochs={epochs}")
    if stage_spec(stage).takes("init_ckpt"):
        # the real path is known once the frozen run has finished (run_all sets it); checks need only a value
        extra.append("finetune.init_ckpt=frozen-run-best.ckpt")
        asked = any(OmegaConf.select(cli, f"finetune.{k}") is not None for k in SCHEDULE_KEYS)
        if not asked:
            if epochs is None:
                epochs = OmegaConf.select(cli, "trainer.max_epochs")
            extra += _without_warmup(argv, epochs)
    return [*argv, *extra]


SCHEDULE_KEYS = ("warmup_epochs", "unfreeze_blocks", "blocks", "milestones")


def _without_warmup(argv: list[str], epochs: int | None) -> list[str]:
    """The fine-tune preset's phases that unfreeze something, moved to start at epoch 0."""
    alone = [a for a in argv if not a.startswith("trainer.max_epochs=")]
    plan = plan_from_config(load_config([*alone, "stage=finetune"]))
    first = next(p.start for p in plan.phases if p.top_blocks > 0)
    total = int(epochs) if epochs is not None else plan.epochs - first
    milestones = [[p.start - first, p.top_blocks] for p in plan.phases if p.top_blocks > 0 and p.start - first < total]
    return [f"finetune.milestones={milestones}".replace(" ", ""), f"trainer.max_epochs={total}"]


def _acc(split: dict) -> str:
    if "acc" not in split:
        return "n/a"
    low, high = split.get("acc_ci95", (float("nan"), float("nan")))
    return f"{split['acc']:.4f} [{low:.3f}, {high:.3f}]"


def _shift(row: dict[str, Any]) -> str:
    """The mean accuracy of the shift report (eval.shifts), or n/a where it was off."""
    value = (row.get("shift") or {}).get("shift_acc")
    return "n/a" if value is None else f"{value:.4f}"


def comparison_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | val acc [95% CI] | test acc [95% CI] | shift acc | val loss | test loss | test ECE | epochs "
        "| wall time (s) | trainable params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        val, test = row["val"] or {}, row["test"] or {}
        lines.append(
            f"| {row['method']} | {_acc(val)} | {_acc(test)} | {_shift(row)} "
            f"| {val.get('loss', float('nan')):.4f} | {test.get('loss', float('nan')):.4f} "
            f"| {test.get('ece', float('nan')):.4f} | {row['epochs']} "
            f"| {row['wall_time_s']:.1f} | {row['trainable_params']:,} |"
        )
    return "\n".join(lines) + "\n"


def paired_tests(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """McNemar between every two methods on the test images (paired by file)."""
    correct = {row["method"]: read_correct(row["test_predictions"]) for row in rows if row.get("test_predictions")}
    tests = []
    for a, b in itertools.combinations(correct, 2):
        tests.append({"a": a, "b": b, **paired_mcnemar(correct[a], correct[b], f"{a} and {b}")})
    return tests


def paired_table(tests: list[dict[str, Any]]) -> str:
    lines = [
        "Paired McNemar tests on the test images (exact binomial; a_only: images A gets right and B wrong):",
        "",
        "| A | B | a_only | b_only | p-value |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {t['a']} | {t['b']} | {t['a_only']} | {t['b_only']} | {t['p_value']:.3g} |" for t in tests]
    return "\n".join(lines) + "\n"


def check_all(argv: list[str], cfg: DictConfig | None = None) -> list[DictConfig]:
    """Every method's configuration (and plan), composed and checked once, before the first one
    starts (the fine-tune's with a placeholder for the frozen run's checkpoint, set when it is known)."""
    cfg = cfg if cfg is not None else load_config(argv)
    epochs = list(cfg.all.epochs) if cfg.all.epochs is not None else [None, None, None]
    return [load_config(_stage_argv(stage, argv, n_epochs)) for (stage, _), n_epochs in zip(METHODS, epochs)]


def run_all(argv: list[str], cfg: DictConfig | None = None) -> dict[str, Any]:
    """Run features, frozen and finetune with the same overrides; write comparison.md/.json.
    ``cfg``: ``argv``'s configuration, if the caller has composed it already."""
    cfg = cfg if cfg is not None else load_config(argv)
    if cfg.ckpt_path:
        raise ConfigError("stage=all starts fresh runs; resume a single stage with stage=<name> ckpt_path=...")
    configs = check_all(argv, cfg)
    all_dir = resolve_all_run(cfg)
    rows, frozen_best = [], None
    for (stage, method), stage_cfg in zip(METHODS, configs):
        if stage_spec(stage).takes("init_ckpt"):
            stage_cfg.finetune.init_ckpt = frozen_best  # the frozen run's best, known now
        metrics = run_stage(stage_cfg, run_name=all_dir.name)
        # what the next method starts from, if it takes an init checkpoint (the fine-tune: the frozen run's
        # best); without checkpointing, the state it ended with
        frozen_best = metrics.get("best_ckpt") or str(Path(metrics["run_dir"]) / "checkpoints" / "last.ckpt")
        rows.append({"method": method, **metrics})
    tests = paired_tests(rows)
    table = comparison_table(rows) + "\n" + paired_table(tests)
    result = {
        "stage": "all",
        "backbone": cfg.model.backbone,
        "run_dir": str(all_dir),
        "methods": rows,
        "mcnemar": tests,
    }
    all_dir.write_text("config.yaml", to_yaml(cfg))
    all_dir.write_text("comparison.md", f"# {cfg.model.backbone} on {cfg.data.root}\n\n{table}")
    all_dir.write_json("comparison.json", result)
    if is_rank_zero():
        _log_table(all_dir.path, table)
        print(f"\n{table}\nwritten to {Path(all_dir) / 'comparison.md'}")
    return result


def _log_table(all_dir: Path, table: str) -> None:
    writer = SummaryWriter(str(all_dir))
    writer.add_text("comparison", table, 0)
    writer.close()
