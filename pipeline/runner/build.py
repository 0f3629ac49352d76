"""Building a stage before its first fit: the data (downloaded, scanned, reported), the run
folder, the model and the datamodule. Layout errors surface here, before any model is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig

from core.atomic_io import check_writable
from core.errors import ConfigError
from datamodules.class_balance import class_counts, describe_counts, resolve_class_weights
from datamodules.data_index import SplitIndex, scan_splits
from datamodules.download import DOWNLOAD_SPLIT, carve_interrupted, prepare_dataset
from datamodules.feature_cache import FeatureDataModule
from datamodules.image_folder import ImageFolderDataModule, default_num_workers
from datamodules.layout import DataLayoutError, data_layout, split_spec
from datamodules.manifest import record_split
from datamodules.near_duplicates import HASH_NAME, tsv_text
from datamodules.stratified_split import parse_split_sizes
from datamodules.subsets import train_subset
from lightning_modules.backbones import backbone_spec, build_backbone
from lightning_modules.classifier import TransferClassifier
from lightning_modules.lora import load_base_weights
from lightning_modules.schedule import Plan
from pipeline.config.identity import TRAINING_CHOICES, check_identity, run_identity
from pipeline.config.load import cache_dir as cache_folder
from pipeline.registry import stage_spec, takes
from pipeline.robustness.shift_report import check_extra_tests
from pipeline.runner.checkpoints import checkpoint_for, state_dict_mismatch
from pipeline.runner.run_dir import RunFolder, is_rank_zero, resolve_run
from pipeline.runner.trainer_factory import apply_speed_settings, expected_world_size


@dataclass
class Build:
    """Everything a stage's fits need, made before the first one starts."""

    run: RunFolder
    resume: str | None  # checkpoint a resumed run continues from
    resume_ckpt: dict | None
    model: TransferClassifier
    datamodule: Any  # ImageFolderDataModule, or FeatureDataModule for stage=features
    extra: dict[str, Any] = field(default_factory=dict)  # for metrics.json

    @property
    def images(self) -> ImageFolderDataModule:
        """The image datamodule (of a features stage: the one its cache was extracted from)."""
        dm = self.datamodule
        return dm.images if isinstance(dm, FeatureDataModule) else dm


def build_stage(cfg: DictConfig, run_name: str | None = None) -> Build:
    """Data, run folder, model and datamodule; a resume or an init checkpoint is checked against
    this run's data identity before the run folder exists."""
    check_writable(cfg.out_dir, f"out_dir={cfg.out_dir}")  # before the scan: a read-only out_dir is found in a second
    index, cache_dir = scan_data(cfg)
    _check_shards(index, expected_world_size(cfg))
    class_weights = _class_weights(cfg, index)
    identity = _identity(cfg, index, class_weights)
    if takes(cfg, "init_ckpt") and cfg.finetune.init_ckpt:
        init = checkpoint_for(cfg.finetune.init_ckpt, cfg.model.backbone)
        check_identity("finetune.init_ckpt", cfg.finetune.init_ckpt, init.get("identity"), identity, TRAINING_CHOICES)
    run, resume = resolve_run(cfg, run_name, identity)
    resume_ckpt = checkpoint_for(resume, cfg.model.backbone) if resume else None
    if resume_ckpt is not None:
        if "plan" not in resume_ckpt:
            raise ConfigError(f"checkpoint {resume} has no plan (an older version wrote it): it cannot be resumed")
        check_identity("cannot resume", resume, resume_ckpt.get("identity"), identity)
    extra = report_data(cfg, index, run)
    check_extra_tests(cfg.eval.extra_tests, index.classes)  # a bad folder fails before training
    apply_speed_settings(cfg)
    model = build_model(cfg, index.classes, class_weights=class_weights, identity=identity)
    images = image_data(
        cfg,
        model,
        index,
        cfg.data.image_size,
        augment=cfg.data.augment,
        seed=cfg.seed,
        decoded_cache_dir=cache_dir if cfg.data.decoded_cache else None,
        balanced_sampler=cfg.data.balanced_sampler,
        random_erasing=cfg.data.random_erasing,
    )
    images.skip_log = run / TRAINING_SKIPS
    if stage_spec(cfg.stage).inputs != "features":
        return Build(run, resume, resume_ckpt, model, images, extra)
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
    return Build(run, resume, resume_ckpt, model, features, extra)


def build_model(
    cfg: DictConfig,
    class_names: list[str],
    plan: Plan | None = None,
    class_weights: list[float] | None = None,
    identity: dict[str, Any] | None = None,
) -> TransferClassifier:
    """The classifier ``cfg`` describes, with its pretrained (or local, or init checkpoint's) weights."""
    model = TransferClassifier(
        backbone=cfg.model.backbone,
        class_names=class_names,
        image_size=cfg.data.image_size,
        head={"pool": cfg.model.pool, "hidden": cfg.model.head_hidden, "dropout": cfg.model.dropout},
        optim_name=cfg.optim.name,
        weight_decay=cfg.optim.weight_decay,
        decay_norm_and_bias=cfg.optim.decay_norm_and_bias,
        train_bn=cfg.finetune.train_bn,
        tta_flip=cfg.model.tta_flip,
        label_smoothing=cfg.optim.label_smoothing,
        inputs=stage_spec(cfg.stage).inputs,
        channels_last=cfg.speed.channels_last,
        grad_checkpointing=cfg.model.grad_checkpointing,
        plan=plan,
        class_weights=class_weights,
        l2sp=cfg.finetune.l2sp if takes(cfg, "l2sp") else 0.0,
        mean=_listed(cfg.data.mean),
        std=_listed(cfg.data.std),
        crop_pct=cfg.data.crop_pct,
        mix=cfg.data.mix,
        lora=_lora_options(cfg),
    )
    if cfg.model.weights or cfg.model.pretrained:
        pretrained = build_backbone(cfg.model.backbone, cfg.model.pretrained, cfg.model.weights)
        if model.hparams.lora is not None:  # targeted layers keep their weights as base_layer
            load_base_weights(model.backbone, pretrained.state_dict())
        else:
            model.backbone.load_state_dict(pretrained.state_dict())
    if takes(cfg, "init_ckpt") and cfg.finetune.init_ckpt:
        ckpt = checkpoint_for(cfg.finetune.init_ckpt, cfg.model.backbone)
        model.on_load_checkpoint(ckpt)  # what Lightning's loading does first
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as err:
            raise state_dict_mismatch(cfg.finetune.init_ckpt, err) from None
    model.identity = identity  # after the init checkpoint's hook, which sets the identity it recorded
    if model.hparams.l2sp > 0:
        model.set_l2sp_reference()  # the weights the fine-tune starts from (pretrained, or init_ckpt's)
    return model


def ensure_data(cfg: DictConfig) -> None:
    """Download and carve ``data.source`` into ``data.root`` if it has no train/ (rank zero only)."""
    if not stage_spec(cfg.stage).fits:  # stage=test evaluates the folder it is given
        return
    prepare_dataset(
        cfg.data.root,
        cfg.data.source,
        cfg.data.url,
        cfg.data.sha256,
        list(cfg.data.split_sizes or DOWNLOAD_SPLIT),
        cfg.seed,
        is_rank_zero=is_rank_zero(),
    )


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


def report_data(cfg: DictConfig, index: SplitIndex, run: RunFolder) -> dict[str, Any]:
    """Skipped files, near duplicates, the split and the class counts: printed, written to the run
    folder, and returned for metrics.json."""
    report_skipped(index, run)
    extra: dict[str, Any] = {"near_duplicates": index.near_duplicate_summary()}
    if split := record_split(index, run.path, split_spec(cfg.data)):  # manifest.csv: the exact split
        extra["split"] = split
    line, warnings_ = describe_counts(index)
    rank_zero_info(line)
    for warning in warnings_:
        rank_zero_warn(warning)
    return extra


def report_skipped(index: SplitIndex, run: RunFolder) -> None:
    """One warning per split with skipped files and one for near duplicates across splits; the
    full lists in the run folder."""
    if index.near_duplicates:
        listing = run.write_text("near_duplicates.tsv", tsv_text(index.near_duplicates))
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
    text = "split\tfile\treason\n" + "".join(f"{s}\t{p}\t{r}\n" for s, p, r in rows)
    listing = run.write_text("skipped_files.tsv", text)
    for split, items in index.skipped.items():
        if items:
            names = ", ".join(Path(p).name for p, _ in items[:5]) + (" ..." if len(items) > 5 else "")
            rank_zero_warn(f"{split}: skipped {len(items)} unreadable image file(s): {names} (all listed in {listing})")


TRAINING_SKIPS = ".skipped_in_training.tsv"  # appended by every process during training (datamodules.image_folder)


def report_training_skips(run: RunFolder) -> dict[str, Any]:
    """Training images that became unreadable after the scan (deleted, an I/O error): added to
    ``skipped_files.tsv`` (split ``train``, reason "... during training") and counted in
    ``metrics.json`` (``skipped_in_training``), with one warning line."""
    try:
        lines = (run / TRAINING_SKIPS).read_text(errors="surrogateescape").splitlines()
    except OSError:
        return {}
    skips = dict(line.split("\t", 1) for line in reversed(lines) if "\t" in line)  # first reason per file
    if not skips or not is_rank_zero():
        return {"skipped_in_training": len(skips)} if skips else {}
    try:
        listed = (run / "skipped_files.tsv").read_text(errors="surrogateescape")
    except OSError:
        listed = "split\tfile\treason\n"
    rows = "".join(f"train\t{path}\t{reason} (during training)\n" for path, reason in sorted(skips.items()))
    listing = run.write_text("skipped_files.tsv", listed + rows)
    names = ", ".join(Path(p).name for p in sorted(skips)[:5]) + (" ..." if len(skips) > 5 else "")
    rank_zero_warn(f"train: {len(skips)} image file(s) unreadable during training were left out: {names} ({listing})")
    return {"skipped_in_training": len(skips)}


def _identity(cfg: DictConfig, index: SplitIndex, class_weights: list[float] | None) -> dict[str, Any]:
    spec = backbone_spec(cfg.model.backbone)
    identity = run_identity(
        cfg.data.root,
        index.classes,
        index.samples,
        cfg.data.image_size,
        _listed(cfg.data.mean) or spec.mean,
        _listed(cfg.data.std) or spec.std,
        cfg.data.augment,
        class_weights,
    )
    # evaluation's centre crop, recorded only where there is one (identities of earlier runs have none)
    crop = cfg.data.crop_pct if cfg.data.crop_pct is not None else spec.crop_pct or 1.0
    return identity | {"layout": index.source} | ({"crop_pct": round(float(crop), 6)} if crop < 1 else {})


def _listed(value: Any) -> list[float] | None:
    """A list key of the config as plain floats (None stays None)."""
    return None if value is None else [float(x) for x in value]


def _class_weights(cfg: DictConfig, index: SplitIndex) -> list[float] | None:
    try:
        weights = resolve_class_weights(cfg.optim.class_weights, class_counts(index)["train"], index.classes)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if weights is not None:
        shown = ", ".join(f"{c} {w:.3g}" for c, w in zip(index.classes, weights))
        rank_zero_info(f"class weights in the training loss: {shown}")
    return weights


def _check_shards(index: SplitIndex, world: int) -> None:
    """Every process needs at least one image of each split: Lightning refuses an empty shard,
    and a process without evaluation batches would leave the others waiting in the metrics'
    synchronisation."""
    for split, samples in index.samples.items():
        if len(samples) < world:
            raise DataLayoutError(
                f"the {split} split has {len(samples)} image(s), fewer than the {world} processes; "
                "give it at least one image per process, or use fewer devices"
            )


def _lora_options(cfg: DictConfig) -> dict[str, Any] | None:
    """The adapters' settings when the stage takes them and finetune.method=lora (a model hyperparameter)."""
    ft = cfg.finetune
    if not (takes(cfg, "lora") and ft.method == "lora"):
        return None
    targets = list(ft.lora_targets) if ft.lora_targets else None
    return {"rank": ft.lora_rank, "alpha": ft.lora_alpha, "dropout": ft.lora_dropout, "targets": targets}


def image_data(
    cfg: DictConfig, model: TransferClassifier, index: SplitIndex, image_size: int, **options: Any
) -> ImageFolderDataModule:
    """Loaders over ``index`` with ``model``'s preprocessing (mean, std, interpolation, crop) and the
    config's batch size and workers; ``options``: augmentation, seed, caches, sampler."""
    return ImageFolderDataModule(
        index,
        image_size=image_size,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        mean=model.backbone.mean,
        std=model.backbone.std,
        pin_memory=torch.cuda.is_available(),
        interpolation=model.backbone.interpolation,
        crop_pct=model.backbone.crop_pct,
        **options,
    )


def evaluation_images(cfg: DictConfig, model: TransferClassifier, index: SplitIndex) -> ImageFolderDataModule:
    """Loaders over ``index`` with the trained model's own preprocessing and no augmentation."""
    return image_data(cfg, model, index, model.hparams.image_size, augment="none")


def evaluation_data(cfg: DictConfig, model: TransferClassifier) -> ImageFolderDataModule:
    """Validation and test of ``cfg``'s data for a trained model (e.g. a soup of checkpoints)."""
    index, _ = scan_data(cfg)
    return evaluation_images(cfg, model, index)
