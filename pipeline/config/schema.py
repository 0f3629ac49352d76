"""The run configuration's schema: each key's default, help, choices and range, declared once.

Each key is an ``opt`` field (``pipeline/config/fields.py``). OmegaConf's structured config checks key
names and types while merging; :func:`check_values` checks each key's own choices, finiteness,
list shape and range from the same declaration; ``pipeline.config.usage`` prints them as ``--help`` and
:func:`schema_rows` returns them as data (the configuration reference).
Choices come from the modules that implement them, through their packages' light ``choices``
modules, so neither this module nor ``--help`` imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from omegaconf import MISSING, OmegaConf

from datamodules.choices import AUGMENT_PRESETS, MIX_MODES, SHIFT_NAMES, SOURCE_NAMES
from lightning_modules.choices import BACKBONE_NAMES, MONITORS, OPTIMIZERS, POOLS, SCHEDULERS
from pipeline.config.fields import check_key, leaf_keys, opt
from pipeline.registry import STAGE_HELP, STAGE_NAMES, TRAINING_STAGES  # noqa: F401 - re-exported

STAGES = STAGE_NAMES  # each stage's spec: pipeline/registry.py
SOUPS = ("uniform", "greedy")  # pipeline/studies/soup.py
TEMPERATURE_MODES = ("auto", "fit", "off")  # pipeline/runner/evaluation.py calibrate
SHIFT_PRESETS = ("auto", "all", "none")  # pipeline/robustness/shift_report.py resolve_shifts
POSITIVE, NON_NEGATIVE, FRACTION = "(0, inf)", "[0, inf)", "[0, 1)"
RGB = {"length": 3, "shape": "three numbers, [R, G, B]"}


@dataclass
class DataConfig:
    root: str = opt(
        "data/cats_and_dogs_small", "folder with train/, validation/, test/ (<class>/<images>), or <class>/<images>"
    )
    image_size: int | None = opt(
        None,
        "square input size in pixels (null: the backbone's own, from its weights' config; the seed's 150 for "
        "torchvision backbones)",
        range=POSITIVE,
    )
    mean: list[float] | None = opt(
        None, "per-channel normalisation mean (null: the backbone's, e.g. CLIP's for a CLIP ViT)", **RGB
    )
    std: list[float] | None = opt(None, "per-channel normalisation std (null: the backbone's)", **RGB, range=POSITIVE)
    crop_pct: float | None = opt(
        None,
        "evaluation resizes to image_size / crop_pct and keeps the centre (null: the backbone's, timm's weights' "
        "config; 1: no crop, the seed's)",
        range="(0, 1]",
    )
    batch_size: int = opt(
        20, "images per step per device (N devices: N * batch_size per optimizer step)", range=POSITIVE
    )
    num_workers: int | None = opt(None, "loader processes (null: one per CPU core, at most 8)", range=NON_NEGATIVE)
    augment: str = opt(
        "seed",
        "augmentation preset (seed: the seed's Keras augmentation; standard: crop, flip, TrivialAugment; "
        "robust: seed + downscale, colour jitter, blur, JPEG; randaugment, trivialaugment, autoaugment: resize, "
        "flip and torchvision's policy)",
        choices=AUGMENT_PRESETS,
    )
    random_erasing: float = opt(
        0.0, "probability of torchvision's RandomErasing on each training image, after the preset", range="[0, 1]"
    )
    mix: str = opt(
        "none",
        "mix training batches: mixup or cutmix (torchvision's, seeded per step; the loss takes the mixed labels, "
        "accuracy the images' own; not with stage=features)",
        choices=MIX_MODES,
    )
    cache_dir: str | None = opt(None, "feature and decoded-image caches (null: <out_dir>/cache)")
    skip_bad_files: bool = opt(True, "unreadable images are skipped and listed; false: stop with an error")
    decoded_cache: bool = opt(False, "decode + resize each image once into a memory-mapped file")
    source: str = opt(
        "kaggle_cats_vs_dogs",
        "download source when data.root has no train/ and no class folders (none: never)",
        choices=SOURCE_NAMES,
    )
    url: str | None = opt(None, "overrides the source's download address (a mirror, file://...)")
    sha256: str | None = opt("auto", "archive checksum (auto: the source's known one; null: no check)")
    # checked by datamodules/stratified_split.py's parse_split_sizes (counts or fractions)
    split_sizes: list[int | float] | None = opt(
        None,
        "train, validation, test: images per class, or fractions (null: [1000,500,500] per class for a download, "
        "[0.8,0.1,0.1] for your own ROOT/<class>/ folder)",
    )
    split_seed: int = opt(0, "seed of a ROOT/<class>/ folder's split and folds (not `seed`: repeats keep the test set)")
    folds: int | None = opt(
        None, "K-fold cross-validation: the non-test images in K stratified folds (null: off)", range="[2, inf)"
    )
    fold: int | None = opt(None, "with data.folds: the fold that validates (0..K-1); the others train")
    balanced_sampler: bool = opt(False, "draw training images class-balanced (with replacement, seeded per epoch)")
    train_per_class: int | None = opt(
        None, "train on a nested, seeded subset of N images per class (learning curves; null: all)", range="[1, inf)"
    )
    drop_near_duplicates: bool = opt(
        False, "remove validation/test images that near-duplicate an earlier split's (listed either way)"
    )


@dataclass
class ModelConfig:
    backbone: str = opt(
        "efficientnet_lite0",
        "backbone (lightning_modules/backbones.py); the default's ImageNet weights ship with the install (offline); "
        "the seed's is vgg16 (its presets: configs/stage/ alone)",
        choices=BACKBONE_NAMES,
        other="timm:<name>, a timm network, e.g. timm:resnet50.a1_in1k, timm:vit_base_patch16_clip_224.openai "
        "(families: docs/backbones.md; pip install -e '.[timm]')",
    )
    pretrained: bool = opt(True, "ImageNet weights (false: random initialisation)")
    weights: str | None = opt(None, "a local state dict of the backbone's network, .pth or .safetensors (offline)")
    pool: str = opt("avg", "pooling before the head (avg: global average; flatten: the seed's)", choices=POOLS)
    head_hidden: int = opt(256, "hidden width of the head (0: a linear head)", range=NON_NEGATIVE)
    dropout: float = opt(0.5, "dropout before the head's output layer", range=FRACTION)
    tta_flip: bool = opt(False, "evaluate each image and its mirror, average the logits")
    grad_checkpointing: bool = opt(
        False, "recompute each trained block's activations in the backward pass (less memory, one more forward)"
    )


@dataclass
class OptimConfig:
    name: str = opt("rmsprop", "optimizer (rmsprop: Keras' defaults, as in the seed)", choices=OPTIMIZERS)
    lr: float = opt(2e-5, "the head's peak learning rate", range=POSITIVE)
    weight_decay: float = opt(0.0, "weight decay (not on norm weights and biases, see next key)", range=NON_NEGATIVE)
    decay_norm_and_bias: bool = opt(False, "apply weight decay to norm weights and biases too")
    scheduler: str = opt(
        "none",
        "learning-rate schedule (cosine: over the whole stage; onecycle: restarted per phase)",
        choices=SCHEDULERS,
    )
    lr_warmup_epochs: float = opt(
        0.0, "linear warm-up epochs (fractions allowed); onecycle: its rise per phase", range=NON_NEGATIVE
    )
    label_smoothing: float = opt(0.0, "label smoothing of the training loss", range=FRACTION)
    class_weights: Any = opt(
        None,
        "loss weight per class: auto (inverse frequency), [w0, w1, ...] (one per class) or null",
        choices=("auto",),
        lists=True,
    )
    ema_decay: float = opt(
        0.0, "exponential moving average of the weights, evaluated and saved as the model (0: off)", range=FRACTION
    )


@dataclass
class FinetuneConfig:
    warmup_epochs: int = opt(0, "epochs with the backbone frozen before the unfreeze", range=NON_NEGATIVE)
    unfreeze_blocks: int = opt(
        1, "top backbone blocks unfrozen after the warm-up (finetune.blocks=top:K)", range=NON_NEGATIVE
    )
    # checked by lightning_modules/schedule.py's parse_blocks
    blocks: Any = opt(
        None,
        "the blocks that train after the warm-up, replacing unfreeze_blocks (surgical fine-tuning; 0 = the stem)",
        other="top:K, bottom:K or a list of block indices, e.g. [0,3]",
    )
    milestones: list[list[int]] | None = opt(
        None,
        "gradual unfreezing: [[epoch, top_blocks], ...] (replaces warmup_epochs and unfreeze_blocks)",
        range=NON_NEGATIVE,
        pairs=True,
        shape="a non-empty list of [epoch, top_blocks] pairs of whole numbers >= 0",
    )
    backbone_lr_ratio: float = opt(1.0, "peak rate of the top block relative to optim.lr", range=NON_NEGATIVE)
    layer_decay: float = opt(
        1.0, "block k from the top trains at lr * backbone_lr_ratio * layer_decay**k", range="(0, 1]"
    )
    train_bn: bool = opt(False, "BatchNorm of unfrozen blocks trains (false: frozen statistics)")
    method: str = opt(
        "unfreeze",
        "what trains in the plan's blocks: their weights (unfreeze), or low-rank adapters beside them (lora; "
        "pip install -e '.[lora]')",
        choices=("unfreeze", "lora"),
    )
    lora_rank: int = opt(8, "finetune.method=lora: the adapters' rank", range=POSITIVE)
    lora_alpha: float = opt(16.0, "finetune.method=lora: the adapters' scale is alpha / rank", range=POSITIVE)
    lora_dropout: float = opt(0.0, "finetune.method=lora: dropout on the adapters' input", range=FRACTION)
    lora_targets: list[str] | None = opt(
        None,
        "finetune.method=lora: layer names to adapt (null: attention qkv/proj and MLP fc1/fc2 of a "
        "transformer, the pointwise convolutions of a CNN)",
    )
    init_ckpt: str | None = opt(None, "start from this checkpoint's weights (e.g. a frozen run's)")
    l2sp: float = opt(
        0.0,
        "L2-SP: lambda/2 * ||w - w_pretrained||^2 on the trained backbone, no decay there (0: off)",
        range=NON_NEGATIVE,
    )
    # checked and normalised by pipeline/config/load.py's wise_alphas
    wise: Any = opt(
        None,
        "WiSE-FT after the last phase: [a, ...] in 0..1 between the head-only model (a=0) and the fine-tuned one "
        "(a=1), chosen by validation; true = [0,0.25,0.5,0.75,1]",
    )


@dataclass
class EarlyStopConfig:
    patience: int = opt(0, "end a phase after this many epochs without improvement (0: off)", range=NON_NEGATIVE)
    monitor: str = opt("val/acc", "the validation metric early stopping watches", choices=tuple(MONITORS))


@dataclass
class SpeedConfig:
    channels_last: bool = opt(True, "NHWC convolutions (faster on recent GPUs and CPUs)")
    compile: bool = opt(False, "torch.compile the model (first epoch pays the compilation)")


@dataclass
class LogConfig:
    images_every_n_epochs: int = opt(
        1, "confusion matrix, error images, PR curve every N epochs (0: no images at all)", range=NON_NEGATIVE
    )
    # bounded: each grid image is decoded, drawn and held until the grid is written
    max_images: int = opt(16, "images per TensorBoard grid (at most 64)", range="[1, 64]")
    mlflow: bool = opt(False, "also log params, metrics and the best checkpoint to MLflow (pip install -e '.[mlflow]')")
    mlflow_uri: str | None = opt(None, "MLflow tracking URI (null: the local folder <out_dir>/mlruns)")


@dataclass
class EvalConfig:
    temperature: str = opt(
        "auto",
        "auto: keep a fitted temperature only when validation supports it and it lowers NLL without raising "
        "ECE; fit: keep any finite fit (clamped to 0.05..20); off: T=1",
        choices=TEMPERATURE_MODES,
    )
    # auto: the shifted copies of the test set cost an evaluation each, seconds on a GPU but many
    # minutes on a CPU, so a CPU run asks for them explicitly (pipeline/robustness/shift_report.py)
    shifts: Any = opt(
        "auto",
        "shift report on the test split, each shift at 2 severities (auto: all shifts on a GPU, none on CPU)",
        choices=SHIFT_PRESETS,
        other=f"a list of: {', '.join(SHIFT_NAMES)}",
    )
    shift_seed: int = opt(0, "seed of the shifts' per-image randomness (not `seed`: repeats see the same shifts)")
    # checked by pipeline/robustness/shift_report.py's parse_extra_tests
    extra_tests: list[str] = opt([], "more test folders, [name=path,...], each <path>/<class>/<images>: clean metrics")


@dataclass
class LrFindConfig:
    min_lr: float = opt(1e-7, "stage=lr_find: lowest rate of the range test", range=POSITIVE)
    max_lr: float = opt(1.0, "stage=lr_find: highest rate of the range test", range=POSITIVE)
    num_steps: int = opt(100, "stage=lr_find: training steps (at most one epoch)", range="[5, inf)")


@dataclass
class AllConfig:
    epochs: list[int] | None = opt(
        None,
        "stage=all: [features, frozen, finetune] epochs (null: trainer.max_epochs, else presets)",
        range="[1, inf)",
        length=3,
        shape="three epoch counts of at least 1 (features, frozen, finetune)",
    )


LAUNCH_MODES = ("serial", "local", "slurm")  # pipeline/studies/launch.py


@dataclass
class LaunchConfig:
    mode: str = opt(
        "serial",
        "how a study's cells (seeds, sweep.*, folds, soups) run: serial: one after another in this process; "
        "local: separate processes, one per GPU or launch.parallel on CPU; slurm: a SLURM job array (submitit)",
        choices=LAUNCH_MODES,
    )
    parallel: int | None = opt(
        None, "cells at once (null: local: one per visible GPU, else 1; slurm: no limit)", range=POSITIVE
    )
    gpus_per_cell: int = opt(1, "GPUs each cell gets (0 or trainer.accelerator=cpu: none)", range=NON_NEGATIVE)
    cpus_per_cell: int | None = opt(None, "slurm: CPU cores per task (null: SLURM's default)", range=POSITIVE)
    mem_gb: float | None = opt(None, "slurm: memory per node in GB (null: SLURM's default)", range=POSITIVE)
    time_min: int = opt(240, "slurm: time limit of each cell in minutes", range=POSITIVE)
    partition: str | None = opt(None, "slurm: partition (null: the cluster's default)")
    account: str | None = opt(None, "slurm: account to charge")
    sbatch: list[str] = opt([], "slurm: more sbatch options, name=value: launch.sbatch=[qos=high,constraint=a100]")
    wait: bool = opt(False, "slurm: wait for the job array and write the summary (false: print the job id, return)")


TRAINER_DEFAULTS = {
    "max_epochs": 30,
    "accelerator": "auto",
    "devices": "auto",
    "precision": "auto",
    "log_every_n_steps": 10,
}
TRAINER_HELP = "any lightning.Trainer argument"


@dataclass
class RunConfig:
    stage: str = opt("finetune", "what to run (stages above)", choices=STAGES)
    seed: int = opt(42, "global seed")
    out_dir: str = opt("runs", "where runs go")
    ckpt_path: str | None = opt(None, "resume (a path, or 'last'); stage=test: the checkpoint to evaluate")
    slurm_requeue: bool = opt(
        False, "under SLURM: Lightning's auto-requeue (hpc_ckpt_N.ckpt); off: a requeued job resumes its last.ckpt"
    )
    # Studies around any stage (pipeline/studies/repeats.py, soup.py; docs/uncertainty.md): read from the
    # command line by the study, which runs each cell as an ordinary run of the stage.
    seeds: list[int] | None = opt(None, "seeds=[1,2,3]: run once per seed; summary.md with mean, sd and 95% interval")
    sweep: dict[str, Any] = opt(
        {},
        "sweep.<key>=[a,b,...]: run every value of any key (with seeds: the full grid); "
        "the same command again continues an interrupted sweep",
    )
    soup: str | None = opt(
        None, "after seeds=[...] of fine-tunes from one finetune.init_ckpt: average them (greedy: on validation)",
        choices=SOUPS,
    )
    search: dict[str, Any] = opt(
        {},
        "search.<key>=log(a,b)|float(a,b)|int(a,b)|[a,b,...] and search.trials=N: an Optuna search, chosen on "
        "validation (search.sampler=tpe|random, search.prune=true, search.storage=<database URL>; "
        "pipeline/studies/search.py)",
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    log: LogConfig = field(default_factory=LogConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    all: AllConfig = field(default_factory=AllConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lr_find: LrFindConfig = field(default_factory=LrFindConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    # Free-form on purpose: every key is passed to lightning.Trainer; pipeline.config.load checks them.
    trainer: dict[str, Any] = opt(TRAINER_DEFAULTS, TRAINER_HELP)



KEYS = {key.name: key for key in leaf_keys(RunConfig)}


class SchemaRow(NamedTuple):
    key: str
    type: str
    default: Any
    help: str
    choices: tuple[str, ...]
    other: str  # other valid values, in words
    range: str | None


def schema_rows(schema: type = RunConfig) -> list[SchemaRow]:
    """Every key of ``schema`` (train.py's; predict.py's) as data, in declaration order (the
    configuration reference, --help); ``trainer.*`` as its default keys."""
    rows = []
    for key in (KEYS if schema is RunConfig else _keys(schema)).values():
        if key.name == "trainer":
            help_ = "a lightning.Trainer argument (any other passes as trainer.<name>=...)"
            rows += [SchemaRow(f"trainer.{k}", "Any", v, help_, (), "", None) for k, v in key.default.items()]
            continue
        rng = key.meta["range"]
        rows.append(
            SchemaRow(
                key.name,
                str(key.field.type),
                key.default,
                key.meta["help"],
                key.meta["choices"],
                key.meta["other"] or ("a list" if key.meta["lists"] else ""),
                rng.text if rng else None,
            )
        )
    return rows


def check_value(name: str, value: Any) -> None:
    """The key ``name``'s own rules (:func:`pipeline.config.fields.check_key`); a one-line ConfigError."""
    check_key(KEYS[name], value)


def check_values(cfg: Any, schema: type = RunConfig) -> None:
    """Each key's own rules (:func:`pipeline.config.fields.check_key`) for every key of ``cfg``, a
    config composed on ``schema``."""
    for name, key in (KEYS if schema is RunConfig else _keys(schema)).items():
        check_key(key, OmegaConf.select(cfg, name))


def _keys(schema: type) -> dict[str, Any]:
    return {key.name: key for key in leaf_keys(schema)}


EXPORT_FORMATS = ("onnx", "torchscript")  # pipeline/export.py


@dataclass
class PredictConfig:
    """``predict.py``'s keys (its --help is generated from them, as train.py's)."""

    ckpt_path: str = opt(MISSING, "a checkpoint of this project (a run's best-*.ckpt or last.ckpt); required")
    inputs: str | None = opt(None, "a file, a folder (searched recursively) or a glob of images to classify")
    output: str = opt("predictions.csv", "the CSV written (checked writable before any image is classified)")
    batch_size: int = opt(32, "images per batch", range=POSITIVE)
    num_workers: int | None = opt(None, "loader processes (null: one per core, at most 8)", range=NON_NEGATIVE)
    device: str = opt("auto", "auto: a CUDA GPU if there is one, else the CPU", other="a torch device: cpu, cuda:1")
    export: str | None = opt(
        None, "write the model as ONNX or TorchScript, checked against PyTorch", choices=EXPORT_FORMATS
    )
    export_path: str | None = opt(None, "where the export goes (null: beside the checkpoint)")
    cam_dir: str | None = opt(None, "a Grad-CAM overlay PNG of each image in this folder (pip install -e '.[cam]')")
