"""Run one stage end to end: build, plan, run the phases, evaluate the best model, report.

The schedule itself is decided in ``lightning_modules/schedule.py``; this module executes it:
one ``fit`` per phase (so DDP wraps exactly that phase's trainable set), the state handed from
one phase to the next through ``checkpoints/last.ckpt``, which the runner writes itself at the
end of every phase (whatever ``trainer.*`` says about checkpointing or validation).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from datamodules.class_balance import class_counts, describe_counts, resolve_class_weights
from datamodules.download import DOWNLOAD_SPLIT, carve_interrupted
from datamodules.feature_cache import FeatureDataModule
from datamodules.flat_folder import parse_split_sizes, record_split, split_spec
from datamodules.image_folder import (
    DataLayoutError,
    ImageFolderDataModule,
    SplitIndex,
    data_layout,
    default_num_workers,
    scan_splits,
)
from datamodules.subsets import train_subset
from lightning_modules.backbones import backbone_spec, build_backbone
from lightning_modules.classifier import TransferClassifier
from lightning_modules.early_stopping import PhaseEarlyStopping
from lightning_modules.ema import PlanEMA
from lightning_modules.errors import IdentityError
from lightning_modules.freeze_schedule import ApplyPlan, count_trainable
from lightning_modules.run_safety import EpochTimer, SaveOnInterrupt
from lightning_modules.schedule import Plan
from lightning_modules.time_estimate import TimeEstimate
from pipeline.config import MONITORS, ConfigError, flatten_keys, plan_from_config, to_yaml
from pipeline.config import cache_dir as cache_folder
from pipeline.evaluation import INTERVALS, Evaluation, best_checkpoint, evaluate_best, summarise, write_predictions
from pipeline.identity import TRAINING_CHOICES, check_identity, run_identity, split_digest
from pipeline.mlflow_logging import log_results
from pipeline.run_dir import release_all, resolve_run, write_json_atomic, write_text_atomic
from pipeline.shift_report import check_extra_tests, report_robustness, shift_accuracy
from pipeline.trainer_factory import apply_speed_settings, expected_world_size, make_trainer, on_gpu
from pipeline.wise import run_wise, save_theta0


class RunInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped a fit after its state was saved; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def load_checkpoint(path: str) -> dict:
    """A checkpoint loaded without running pickled code (``weights_only=True``), or a clear error."""
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure: refuse the file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"checkpoint {path} cannot be loaded safely with weights_only=True ({first})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"{path} is not a checkpoint of this project (no state_dict)")
    return ckpt


def _check_ckpt_backbone(path: str, backbone: str) -> dict:
    ckpt = load_checkpoint(path)
    found = ckpt.get("backbone") or ckpt.get("hyper_parameters", {}).get("backbone")
    if found != backbone:
        raise ConfigError(f"checkpoint {path} was trained with backbone {found!r}, not model.backbone={backbone!r}")
    return ckpt


def model_from_checkpoint(path: str) -> TransferClassifier:
    """The trained model of a checkpoint of this project (for evaluation and prediction)."""
    load_checkpoint(path)  # refuses unsafe pickles with a clear error
    try:
        return TransferClassifier.load_from_checkpoint(path, map_location="cpu")
    except TypeError as err:  # hyperparameters this version does not have
        raise ConfigError(
            f"checkpoint {path} was written by an older version of this project ({err}); "
            "evaluate it with that version, or train again"
        ) from None
    except RuntimeError as err:
        raise _state_dict_mismatch(path, err) from None


def _state_dict_mismatch(path: str, err: RuntimeError) -> Exception:
    """A clear error for weights that do not fit this version's network (e.g. convnext_tiny
    gained its pretrained final LayerNorm in issue 11); other errors are returned unchanged."""
    if not str(err).startswith("Error(s) in loading state_dict"):
        return err
    detail = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else ""
    return ConfigError(
        f"checkpoint {path} does not fit this version's network ({detail[:160]}); "
        "it was written by an older version of this project: train again"
    )


def _identity(cfg: DictConfig, index: SplitIndex, class_weights: list[float] | None) -> dict[str, Any]:
    spec = backbone_spec(cfg.model.backbone)
    identity = run_identity(
        cfg.data.root,
        index.classes,
        index.samples,
        cfg.data.image_size,
        spec.mean,
        spec.std,
        cfg.data.augment,
        class_weights,
    )
    return identity | {"layout": index.source}


def build_model(
    cfg: DictConfig,
    class_names: list[str],
    plan: Plan | None = None,
    class_weights: list[float] | None = None,
    identity: dict[str, Any] | None = None,
) -> TransferClassifier:
    model = TransferClassifier(
        backbone=cfg.model.backbone,
        class_names=class_names,
        image_size=cfg.data.image_size,
        pool=cfg.model.pool,
        head_hidden=cfg.model.head_hidden,
        dropout=cfg.model.dropout,
        optim_name=cfg.optim.name,
        weight_decay=cfg.optim.weight_decay,
        decay_norm_and_bias=cfg.optim.decay_norm_and_bias,
        train_bn=cfg.finetune.train_bn,
        tta_flip=cfg.model.tta_flip,
        label_smoothing=cfg.optim.label_smoothing,
        inputs="features" if cfg.stage == "features" else "images",
        channels_last=cfg.speed.channels_last,
        plan=plan,
        class_weights=class_weights,
        l2sp=cfg.finetune.l2sp if cfg.stage == "finetune" else 0.0,
    )
    if cfg.model.weights or cfg.model.pretrained:
        pretrained = build_backbone(cfg.model.backbone, cfg.model.pretrained, cfg.model.weights)
        model.backbone.load_state_dict(pretrained.state_dict())
    if cfg.stage == "finetune" and cfg.finetune.init_ckpt:
        ckpt = _check_ckpt_backbone(cfg.finetune.init_ckpt, cfg.model.backbone)
        model.on_load_checkpoint(ckpt)  # what Lightning's loading does first (older checkpoints: T=1)
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as err:
            raise _state_dict_mismatch(cfg.finetune.init_ckpt, err) from None
    model.identity = identity  # after the init checkpoint's hook, which sets the identity it recorded
    if model.hparams.l2sp > 0:
        model.set_l2sp_reference()  # the weights the fine-tune starts from (pretrained, or init_ckpt's)
    return model


def _resume_point(ckpt: dict | None) -> tuple[int, int]:
    """(epoch, global step) a fit resumed from ``ckpt`` starts at; the epoch counts epochs whose
    training finished, so a mid-epoch (interrupt) checkpoint resumes inside its epoch."""
    if ckpt is None:
        return 0, 0
    return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]), int(ckpt["global_step"])


def _report_skipped(index, run_dir: Path) -> None:
    """One warning per split with skipped files and one for near duplicates across splits; the
    full lists in the run folder (rank zero)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from lightning.pytorch.utilities import rank_zero_warn

    from datamodules.near_duplicates import HASH_NAME, tsv_text

    if rank_zero_only.rank != 0:
        return
    if index.near_duplicates:
        listing = run_dir / "near_duplicates.tsv"
        write_text_atomic(listing, tsv_text(index.near_duplicates))
        dropped = sum(len(files) for files in index.dropped.values())
        action = (
            f"{dropped} removed from validation/test (data.drop_near_duplicates=true)"
            if dropped
            else "data.drop_near_duplicates=true removes them from validation/test"
        )
        rank_zero_warn(
            f"found {len(index.near_duplicates)} near-duplicate image pair(s) across splits ({HASH_NAME}, "
            f"distance <= {index.near_duplicate_distance}): listed in {listing}; {action}"
        )
    rows = [(split, path, reason) for split, items in index.skipped.items() for path, reason in items]
    if not rows:
        return
    listing = run_dir / "skipped_files.tsv"
    write_text_atomic(listing, "split\tfile\treason\n" + "".join(f"{s}\t{p}\t{r}\n" for s, p, r in rows))
    for split, items in index.skipped.items():
        if items:
            names = ", ".join(Path(p).name for p, _ in items[:5]) + (" ..." if len(items) > 5 else "")
            rank_zero_warn(f"{split}: skipped {len(items)} unreadable image file(s): {names} (all listed in {listing})")


def _finish(cfg, run_dir, trainer, model, started, val, test, extra=None) -> dict[str, Any]:
    metrics = {
        "stage": cfg.stage,
        "backbone": cfg.model.backbone,
        "epochs": int(trainer.current_epoch),
        "wall_time_s": round(time.time() - started, 2),
        "val": val,
        "test": test,
        "intervals": INTERVALS,
        "trainable_params": count_trainable(model),
        "run_dir": str(run_dir),
        **(extra or {}),
    }
    if trainer.is_global_zero:
        write_json_atomic(run_dir / "metrics.json", metrics)
        hp_metrics = {
            f"hparams/{split}_{k}": v
            for split, d in (("val", val), ("test", test))
            if d
            for k, v in d.items()
            if k != "count" and isinstance(v, (int, float))
        }
        flat = {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in flatten_keys(OmegaConf.to_container(cfg, resolve=True)).items()
        }
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(flat, hp_metrics)
            else:  # MLflow: params, metrics and the files a reader of the run needs
                files = [Path(p) for p in (metrics.get("best_ckpt"), metrics.get("ckpt_path")) if p]
                files += [run_dir / "metrics.json", run_dir / "config.yaml"]
                log_results(logger, flat, hp_metrics, files)
            logger.finalize("success")
    return metrics


def ensure_data(cfg: DictConfig) -> None:
    """Download and carve ``data.source`` into ``data.root`` if it has no train/ (rank zero only)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from datamodules.download import prepare_dataset

    if cfg.stage == "test":
        return
    prepare_dataset(
        cfg.data.root,
        cfg.data.source,
        cfg.data.url,
        cfg.data.sha256,
        list(cfg.data.split_sizes or DOWNLOAD_SPLIT),
        cfg.seed,
        is_rank_zero=rank_zero_only.rank == 0,
    )


@dataclass
class Build:
    """Everything a stage's fits need, made before the first one starts."""

    run_dir: Path
    resume: str | None  # checkpoint a resumed run continues from
    resume_ckpt: dict | None
    model: TransferClassifier
    datamodule: Any
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PhasesDone:
    trainer: Trainer
    plan: Plan  # as executed (early stops included)
    timer: EpochTimer
    phases: list[dict[str, Any]]


def run_stage(cfg: DictConfig, run_name: str | None = None) -> dict[str, Any]:
    """Run ``cfg.stage``; returns (and writes to the run folder) the metrics."""
    try:
        return _run_stage(cfg, run_name)
    finally:
        release_all()  # the run folder's lock (pipeline/run_dir.py)


def _run_stage(cfg: DictConfig, run_name: str | None) -> dict[str, Any]:
    started = time.time()
    seed_everything(cfg.seed, workers=True)
    if cfg.stage == "test":
        return _run_test(cfg, run_name, started)
    build = build_stage(cfg, run_name)
    if cfg.stage == "lr_find":
        from pipeline.lr_find import run_lr_find

        return run_lr_find(cfg, build)
    plan = plan_for_run(cfg, build.resume_ckpt)
    announce(cfg, build.run_dir, plan)
    done = run_phases(cfg, build, plan)
    if done.plan != plan:  # a phase stopped early: config.yaml shows the plan as executed
        _write_config(cfg, build.run_dir, done.plan)
    if isinstance(build.datamodule, FeatureDataModule):
        build.extra["feature_cache"] = {"path": str(build.datamodule.path), "built": build.datamodule.computed}
    best = best_checkpoint(done.trainer)
    if cfg.stage == "finetune" and cfg.finetune.wise:
        test_samples = _images(build.datamodule)._index().samples["test"]
        shift_acc = partial(shift_accuracy, cfg, done.trainer, samples=test_samples)
        best, build.extra["wise"] = run_wise(
            cfg, done.trainer, build.model, build.datamodule, build.run_dir, best, summarise, shift_acc
        )
    result = evaluate_best(done.trainer, build.model, build.datamodule, build.run_dir, cfg.eval.temperature, best)
    _record_predictions(done.trainer, build, result)
    test_samples = _images(build.datamodule)._index().samples["test"]
    clean = (result.test or {}).get("acc")
    build.extra |= report_robustness(cfg, done.trainer, build.model, test_samples, build.run_dir, clean)
    extra = build.extra | {"best_ckpt": result.best, "calibration": result.calibration, "phases": done.phases}
    extra |= _speed_report(done.timer)
    return _finish(cfg, build.run_dir, done.trainer, build.model, started, result.val, result.test, extra)


def _record_predictions(trainer: Trainer, build: Build, result: Evaluation) -> None:
    """``test_predictions.csv`` in the run folder (global rank zero)."""
    if result.test_predictions is None or not trainer.is_global_zero:
        return
    files = [path for path, _ in _images(build.datamodule)._index().samples["test"]]
    path = build.run_dir / "test_predictions.csv"
    write_predictions(path, files, build.model.class_names, build.model.binary, result.test_predictions)
    build.extra["test_predictions"] = str(path)


def _images(datamodule) -> ImageFolderDataModule:
    """The image datamodule (of a features stage: the one its cache was extracted from)."""
    return datamodule.images if isinstance(datamodule, FeatureDataModule) else datamodule


def build_stage(cfg: DictConfig, run_name: str | None = None) -> Build:
    """Data (layout errors surface here, before any model), run folder, model and datamodule."""
    index, cache_dir = scan_data(cfg)
    _check_shards(index, expected_world_size(cfg))
    class_weights = _class_weights(cfg, index)
    identity = _identity(cfg, index, class_weights)
    if cfg.stage == "finetune" and cfg.finetune.init_ckpt:  # checked before the run folder exists
        init = _check_ckpt_backbone(cfg.finetune.init_ckpt, cfg.model.backbone)
        check_identity("finetune.init_ckpt", cfg.finetune.init_ckpt, init.get("identity"), identity, TRAINING_CHOICES)
    run_dir, resume = resolve_run(cfg, run_name, identity)
    resume_ckpt = _check_ckpt_backbone(resume, cfg.model.backbone) if resume else None
    if resume_ckpt is not None:
        if "plan" not in resume_ckpt:
            raise ConfigError(f"checkpoint {resume} has no plan (an older version wrote it): it cannot be resumed")
        check_identity("cannot resume", resume, resume_ckpt.get("identity"), identity)
    extra = report_data(cfg, index, run_dir)
    check_extra_tests(cfg.eval.extra_tests, index.classes)  # a bad folder fails before training
    apply_speed_settings(cfg)
    model = build_model(cfg, index.classes, class_weights=class_weights, identity=identity)
    images = ImageFolderDataModule(
        cfg.data.root,
        image_size=cfg.data.image_size,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        augment=cfg.data.augment,
        mean=model.backbone.mean,
        std=model.backbone.std,
        pin_memory=torch.cuda.is_available(),
        index=index,
        seed=cfg.seed,
        decoded_cache_dir=cache_dir if cfg.data.decoded_cache else None,
        balanced_sampler=cfg.data.balanced_sampler,
        interpolation=model.backbone.interpolation,
    )
    if cfg.stage != "features":
        return Build(run_dir, resume, resume_ckpt, model, images, extra)
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.get("accelerator", "auto") != "cpu" else "cpu"
    features = FeatureDataModule(
        images,
        model,
        cache_dir,
        cfg.model.pool,
        device,
        flip_train=cfg.data.augment != "none",
        flip_eval=cfg.model.tta_flip,
    )
    return Build(run_dir, resume, resume_ckpt, model, features, extra)


def scan_data(cfg: DictConfig) -> tuple[SplitIndex, str]:
    """The checked image lists of the three splits (downloaded, read from folders or split from
    a folder of class folders; subset for a learning curve) and the cache folder."""
    if carve_interrupted(cfg.data.root):  # a killed download's carve: finished before the layout is judged
        ensure_data(cfg)
    layout = data_layout(cfg.data.root)  # a folder of class folders is split here, never downloaded into
    sizes = cfg.data.split_sizes
    if layout == "none" and cfg.data.source != "none" and sizes and parse_split_sizes(sizes)[0] == "fractions":
        raise ConfigError(
            f"data.split_sizes={list(sizes)}: fractions split your own ROOT/<class>/ folder; "
            f"a download (data.source={cfg.data.source}) takes counts per class, e.g. [1000,500,500]"
        )
    if layout != "flat":
        ensure_data(cfg)
    cache_dir = cache_folder(cfg)
    index = scan_splits(
        cfg.data.root,
        skip_bad_files=cfg.data.skip_bad_files,
        threads=cfg.data.num_workers or default_num_workers(),
        cache_dir=cache_dir,
        drop_near_duplicates=cfg.data.drop_near_duplicates,
        split=split_spec(cfg.data),
    )
    if cfg.data.train_per_class is not None:
        index = train_subset(index, cfg.data.train_per_class, cfg.seed)
        rank_zero_info(
            f"training on {len(index.samples['train'])} images: data.train_per_class={cfg.data.train_per_class} "
            f"(seeded by seed={cfg.seed}); validation and test whole"
        )
    return index, cache_dir


def report_data(cfg: DictConfig, index: SplitIndex, run_dir: Path) -> dict[str, Any]:
    """Skipped files, near duplicates, the split and the class counts: printed, written to the run
    folder, and returned for metrics.json."""
    _report_skipped(index, run_dir)
    extra: dict[str, Any] = {"near_duplicates": index.near_duplicate_summary()}
    if split := record_split(index, run_dir, split_spec(cfg.data)):  # run_dir/manifest.csv: the exact split
        extra["split"] = split
    line, warnings_ = describe_counts(index)
    rank_zero_info(line)
    for warning in warnings_:
        rank_zero_warn(warning)
    return extra


def _class_weights(cfg: DictConfig, index: SplitIndex) -> list[float] | None:
    try:
        weights = resolve_class_weights(cfg.optim.class_weights, class_counts(index)["train"], index.classes)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if weights is not None:
        shown = ", ".join(f"{c} {w:.3g}" for c, w in zip(index.classes, weights))
        rank_zero_info(f"class weights in the training loss: {shown}")
    return weights


def _check_shards(index, world: int) -> None:
    """Every process needs at least one image of each split: Lightning refuses an empty shard,
    and a process without evaluation batches would leave the others waiting in the metrics'
    synchronisation."""
    for split, samples in index.samples.items():
        if len(samples) < world:
            raise DataLayoutError(
                f"the {split} split has {len(samples)} image(s), fewer than the {world} processes; "
                "give it at least one image per process, or use fewer devices"
            )


def plan_for_run(cfg: DictConfig, resume_ckpt: dict | None) -> Plan:
    """The config's plan; a resumed run replays the early stops its checkpoint recorded, and must
    keep the optimizer it was trained with (its state would not fit another one)."""
    plan = plan_from_config(cfg)
    if resume_ckpt is None:
        return plan
    saved_plan = Plan.from_dict(resume_ckpt["plan"])
    hparams = resume_ckpt.get("hyper_parameters", {})
    now = {
        "optimizer groups": [name for name, _ in plan.groups],
        "optim.name": cfg.optim.name,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.decay_norm_and_bias": cfg.optim.decay_norm_and_bias,
        "finetune.l2sp": cfg.finetune.l2sp if cfg.stage == "finetune" else 0.0,
    }
    before = {
        "optimizer groups": [name for name, _ in saved_plan.groups],
        "optim.name": hparams.get("optim_name"),
        "optim.weight_decay": hparams.get("weight_decay"),
        "optim.decay_norm_and_bias": hparams.get("decay_norm_and_bias"),
        "finetune.l2sp": hparams.get("l2sp", 0.0),
    }
    for key, value in now.items():
        if before[key] != value:
            raise ConfigError(
                f"cannot resume: the checkpoint was trained with {key}={before[key]}, this config has {value} "
                "(resume with the same optimizer and unfrozen blocks)"
            )
    plan = plan.replay(saved_plan.early_stops)
    if plan != saved_plan:
        rank_zero_warn(
            "the plan differs from the one the resumed checkpoint was trained with; continuing with the new one:\n"
            f"before: {saved_plan.describe()}\nnow: {plan.describe()}"
        )
    return plan


def announce(cfg: DictConfig, run_dir: Path, plan: Plan) -> None:
    """Print the plan and save it with the resolved config."""
    rank_zero_info(plan.describe())
    _write_config(cfg, run_dir, plan)


def run_phases(cfg: DictConfig, build: Build, plan: Plan) -> PhasesDone:
    """One fit per phase, from the resumed epoch on; the runner writes the hand-over checkpoint."""
    model, run_dir = build.model, build.run_dir
    start, step = _resume_point(build.resume_ckpt)
    build.resume_ckpt = None  # free the resumed state dict
    ckpt, timer, best_epochs = build.resume, EpochTimer(), {}
    fit_model = torch.compile(model) if cfg.speed.compile else model
    # A finished run that is resumed still needs one (empty) fit to restore its trainer state.
    index = plan.phase_index(start) if start < plan.epochs else len(plan.phases) - 1
    trainer, first_fit = None, True
    estimate = TimeEstimate(
        cfg.model.backbone, cfg.data.image_size, plan.epochs, on_cpu=not on_gpu(cfg), done=ckpt is not None
    )
    while index < len(plan.phases):
        phase = plan.phases[index]
        model.set_plan(plan)
        model.set_trainable_top(phase.top_blocks)
        stopper = _early_stopping(cfg, index, run_dir)
        callbacks = [ApplyPlan(plan, index), timer, estimate, *([stopper] if stopper else [])]
        if cfg.optim.ema_decay > 0:
            callbacks.append(PlanEMA(cfg.optim.ema_decay, last_phase=index == len(plan.phases) - 1))
        # purge_step: TensorBoard hides what a killed run logged after the checkpoint this
        # process resumed from; later phases of this process purge nothing
        purge = step if first_fit and ckpt is not None else None
        trainer = make_trainer(cfg, run_dir, callbacks, model=model, max_epochs=phase.end, purge_step=purge)
        _fit(trainer, fit_model, build.datamodule, ckpt)
        first_fit = False
        if stopper is not None and stopper.stopped:
            best_epochs[index] = stopper.restore_best(model, trainer)
            plan = plan.stop_early(index, trainer.current_epoch)
            model.set_plan(plan)
            rank_zero_info(
                f"phase {index} stopped early after epoch {trainer.current_epoch - 1}; "
                f"the next phase starts from its best epoch ({best_epochs[index]})"
            )
        ckpt = str(run_dir / "checkpoints" / "last.ckpt")
        trainer.save_checkpoint(ckpt)  # the hand-over: explicit, whatever trainer.* says
        if cfg.stage == "finetune" and cfg.finetune.wise and phase.top_blocks == 0:
            save_theta0(model, run_dir)  # WiSE-FT's theta_0: the pretrained backbone with its trained head
        if stopper is not None and trainer.is_global_zero:
            stopper.best_path.unlink(missing_ok=True)  # its weights are in last.ckpt now
        index += 1
    return PhasesDone(trainer, plan, timer, _phase_records(plan, best_epochs))


def _phase_records(plan: Plan, best_epochs: dict[int, int | None]) -> list[dict[str, Any]]:
    """What ran, phase by phase, for metrics.json (early stops of earlier processes included)."""
    stops = dict(plan.early_stops)
    records = []
    for index, phase in enumerate(plan.phases):
        record = {"phase": index, "epochs": [phase.start, phase.end], "top_blocks": phase.top_blocks}
        if index in stops:
            record["stopped_early_at_epoch"] = phase.start + stops[index] - 1
            if best_epochs.get(index) is not None:
                record["best_epoch"] = best_epochs[index]
        records.append(record)
    return records


def _early_stopping(cfg: DictConfig, index: int, run_dir: Path) -> PhaseEarlyStopping | None:
    patience = cfg.early_stop.patience
    if patience <= 0:
        return None
    monitor = cfg.early_stop.monitor
    best = run_dir / "checkpoints" / f"phase{index}-best.ckpt"
    return PhaseEarlyStopping(index, best, monitor=monitor, mode=MONITORS[monitor], patience=patience)


def _speed_report(timer: EpochTimer) -> dict[str, Any]:
    """Training throughput (images per second over all epochs, validation excluded) and peak memory."""
    import resource

    seconds = sum(e["seconds"] for e in timer.epochs)
    images = sum(e["images"] for e in timer.epochs)
    report: dict[str, Any] = {
        "train_epoch_seconds": [round(e["seconds"], 3) for e in timer.epochs],
        "train_images_per_s": round(images / seconds, 2) if seconds else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if torch.cuda.is_available():
        report["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return report


@contextlib.contextmanager
def _expected_warnings():
    """Warnings that are intended here: frozen blocks are in eval mode at the start of training,
    and every phase's fit reuses the run's checkpoint folder."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
        warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
        yield


def _fit(trainer: Trainer, model, datamodule, ckpt: str | None) -> None:
    """``trainer.fit``; an interrupt (SIGINT/SIGTERM) that saved a checkpoint becomes RunInterrupted."""
    try:
        with _expected_warnings():
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt)
    except SystemExit as exc:  # Lightning turns SIGINT and SIGTERM into SystemExit
        saver = next(c for c in trainer.callbacks if isinstance(c, SaveOnInterrupt))
        if not saver.saved:
            raise
        signal_name = saver.signal_name if isinstance(exc, SIGTERMException) else "SIGINT"
        raise RunInterrupted(
            f"{signal_name}: stopped at epoch {trainer.current_epoch}, step {trainer.global_step}; state saved "
            f"to {saver.path}; resume with ckpt_path=last",
            143 if signal_name == "SIGTERM" else 130,
        ) from None


def _write_config(cfg: DictConfig, run_dir: Path, plan: Plan | None = None) -> None:
    """``config.yaml``: the resolved config and, for training stages, the plan (global rank zero)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg, plan))


def _run_test(cfg: DictConfig, run_name: str | None, started: float) -> dict[str, Any]:
    threads = cfg.data.num_workers or default_num_workers()
    cache_dir = cache_folder(cfg)
    # A flat folder: the test split the checkpoint's run recorded, if it sits in its run folder.
    recorded = Path(cfg.ckpt_path).resolve().parent.parent / "manifest.csv"
    spec = split_spec(cfg.data, recorded if recorded.is_file() else None)
    index = scan_splits(
        cfg.data.root,
        ("test",),
        skip_bad_files=cfg.data.skip_bad_files,
        threads=threads,
        cache_dir=cache_dir,
        split=spec,
    )
    _check_test_data(cfg, _check_ckpt_backbone(cfg.ckpt_path, cfg.model.backbone), index)
    run_dir, _ = resolve_run(cfg, run_name)
    _report_skipped(index, run_dir)
    split = record_split(index, run_dir, spec)
    model = model_from_checkpoint(cfg.ckpt_path)
    images = _evaluation_images(cfg, model, index)
    _write_config(cfg, run_dir)
    trainer = make_trainer(cfg, run_dir, [])
    test = summarise(trainer.test(model, datamodule=images, verbose=False), "test")  # the result block shows it
    extra = {"ckpt_path": cfg.ckpt_path, **({"split": split} if split else {})}
    extra |= report_robustness(cfg, trainer, model, index.samples["test"], run_dir, (test or {}).get("acc"))
    return _finish(cfg, run_dir, trainer, model, started, None, test, extra)


def _check_test_data(cfg: DictConfig, ckpt: dict, index: SplitIndex) -> None:
    """stage=test compares the test folder with the checkpoint's recorded identity: the classes must
    be the same, in order; another folder is fine (said in one line); the training folder itself must
    give the test split recorded at training, or its figures could include images the model trained on."""
    recorded = ckpt.get("identity")
    if recorded is None:
        check_identity("stage=test", cfg.ckpt_path, None, {})
    if recorded["classes"] != index.classes:
        raise IdentityError(
            f"stage=test: checkpoint {cfg.ckpt_path} was trained on classes {recorded['classes']}, "
            f"the test folder has {index.classes} (names and order must match)"
        )
    now = split_digest(index.samples["test"], cfg.data.root)
    if str(Path(cfg.data.root).resolve()) != recorded["data.root"]:
        rank_zero_info(
            f"stage=test on {cfg.data.root}: not the folder this checkpoint was trained on ({recorded['data.root']}); "
            f"the classes are the same, so these are its figures on {now['files']} other photos"
        )
    elif now != recorded["split"].get("test"):
        raise IdentityError(
            f"stage=test: the test split of {cfg.data.root} is not the one recorded when checkpoint {cfg.ckpt_path} "
            f"was trained ({recorded['split'].get('test', {}).get('files')} -> {now['files']} files): it may hold "
            "images the model trained on; evaluate the run's own split (its manifest.csv) or another folder"
        )


def _evaluation_images(cfg: DictConfig, model: TransferClassifier, index: SplitIndex) -> ImageFolderDataModule:
    """Loaders over ``index`` with the trained model's own preprocessing and no augmentation."""
    return ImageFolderDataModule(
        cfg.data.root,
        image_size=model.hparams.image_size,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        augment="none",
        mean=model.backbone.mean,
        std=model.backbone.std,
        pin_memory=torch.cuda.is_available(),
        index=index,
        interpolation=model.backbone.interpolation,
    )


def evaluation_data(cfg: DictConfig, model: TransferClassifier) -> ImageFolderDataModule:
    """Validation and test of ``cfg``'s data for a trained model (e.g. a soup of checkpoints)."""
    index, _ = scan_data(cfg)
    return _evaluation_images(cfg, model, index)
