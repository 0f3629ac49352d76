"""The run configuration: a typed schema, YAML presets and ``key=value`` overrides.

The schema below is the one source of defaults (the seed's settings) and of each key's help
text (``--help`` is generated from it). Composition order: schema ->
``configs/stage/<stage>.yaml`` -> ``configs/backbone/<backbone>.yaml`` ->
``configs/backbone/<backbone>.<stage>.yaml`` (each if present) -> command line. The schema is an
OmegaConf structured config, so an unknown key or a wrong type fails while merging; choices and
ranges that a type cannot express, and the stage's schedule (:func:`plan_from_config`), are
checked in :func:`validate`, before any work starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from datamodules.transforms import AUGMENT_PRESETS
from lightning_modules.errors import UserError
from lightning_modules.schedule import SCHEDULERS, Plan, PlanError, build_plan, milestones_from

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

STAGES = ("features", "frozen", "finetune", "test", "all", "lr_find")
TRAINING_STAGES = ("features", "frozen", "finetune")
AUGMENTS = AUGMENT_PRESETS  # the one list of presets, in datamodules.transforms
OPTIMIZERS = ("rmsprop", "adam", "adamw", "sgd")
POOLS = ("avg", "flatten")
TEMPERATURE_MODES = ("auto", "fit", "off")
MONITORS = {"val/acc": "max", "val/f1": "max", "val/auroc": "max", "val/loss": "min"}


class ConfigError(UserError, ValueError):
    """A problem with the run's configuration; its message is one line meant for the user."""


def opt(default: Any, help: str) -> Any:  # noqa: A002 - the field's help text
    """A schema field with its default and its ``--help`` line."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    root: str = opt(
        "data/cats_and_dogs_small", "folder with train/, validation/, test/ (<class>/<images>), or <class>/<images>"
    )
    image_size: int = opt(150, "square input size in pixels")
    batch_size: int = opt(20, "images per step per device (N devices: N * batch_size per optimizer step)")
    num_workers: int | None = opt(None, "loader processes (null: one per CPU core, at most 8)")
    augment: str = opt(
        "seed",
        "none | seed (the seed's Keras augmentation) | standard (crop, flip, TrivialAugment) | "
        "robust (seed + downscale, colour jitter, blur, JPEG)",
    )
    cache_dir: str | None = opt(None, "feature and decoded-image caches (null: <out_dir>/cache)")
    skip_bad_files: bool = opt(True, "unreadable images are skipped and listed; false: stop with an error")
    decoded_cache: bool = opt(False, "decode + resize each image once into a memory-mapped file")
    source: str = opt(
        "kaggle_cats_vs_dogs", "download source when data.root has no train/ and no class folders (none: never)"
    )
    url: str | None = opt(None, "overrides the source's download address (a mirror, file://...)")
    sha256: str | None = opt("auto", "archive checksum (auto: the source's known one; null: no check)")
    split_sizes: list[int | float] | None = opt(
        None,
        "train, validation, test: images per class, or fractions (null: [1000,500,500] per class for a download, "
        "[0.8,0.1,0.1] for your own ROOT/<class>/ folder)",
    )
    split_seed: int = opt(0, "seed of a ROOT/<class>/ folder's split and folds (not `seed`: repeats keep the test set)")
    folds: int | None = opt(None, "K-fold cross-validation: the non-test images in K stratified folds (null: off)")
    fold: int | None = opt(None, "with data.folds: the fold that validates (0..K-1); the others train")
    balanced_sampler: bool = opt(False, "draw training images class-balanced (with replacement, seeded per epoch)")
    train_per_class: int | None = opt(
        None, "train on a nested, seeded subset of N images per class (learning curves; null: all)"
    )
    drop_near_duplicates: bool = opt(
        False, "remove validation/test images that near-duplicate an earlier split's (listed either way)"
    )


@dataclass
class ModelConfig:
    backbone: str = opt("vgg16", "registered backbone (see above)")
    pretrained: bool = opt(True, "ImageNet weights (false: random initialisation)")
    weights: str | None = opt(None, "a local state dict of the backbone's network (offline)")
    pool: str = opt("avg", "avg (global average) | flatten (the seed's)")
    head_hidden: int = opt(256, "hidden width of the head (0: a linear head)")
    dropout: float = opt(0.5, "dropout before the head's output layer")
    tta_flip: bool = opt(False, "evaluate each image and its mirror, average the logits")


@dataclass
class OptimConfig:
    name: str = opt("rmsprop", "rmsprop | adam | adamw | sgd")
    lr: float = opt(2e-5, "the head's peak learning rate")
    weight_decay: float = opt(0.0, "weight decay (not on norm weights and biases, see next key)")
    decay_norm_and_bias: bool = opt(False, "apply weight decay to norm weights and biases too")
    scheduler: str = opt("none", "none | cosine (over the whole stage) | onecycle (restarted per phase)")
    lr_warmup_epochs: float = opt(0.0, "linear warm-up epochs (fractions allowed); onecycle: its rise per phase")
    label_smoothing: float = opt(0.0, "label smoothing of the training loss")
    class_weights: Any = opt(None, "loss weight per class: auto (inverse frequency), [w0, w1, ...] or null")
    ema_decay: float = opt(0.0, "exponential moving average of the weights, evaluated and saved as the model (0: off)")


@dataclass
class FinetuneConfig:
    warmup_epochs: int = opt(0, "epochs with the backbone frozen before the unfreeze")
    unfreeze_blocks: int = opt(1, "top backbone blocks unfrozen after the warm-up")
    milestones: list[list[int]] | None = opt(
        None, "gradual unfreezing: [[epoch, top_blocks], ...] (replaces the two above)"
    )
    backbone_lr_ratio: float = opt(1.0, "peak rate of the top block relative to optim.lr")
    layer_decay: float = opt(1.0, "block k from the top trains at lr * backbone_lr_ratio * layer_decay**k")
    train_bn: bool = opt(False, "BatchNorm of unfrozen blocks trains (false: frozen statistics)")
    init_ckpt: str | None = opt(None, "start from this checkpoint's weights (e.g. a frozen run's)")
    l2sp: float = opt(0.0, "L2-SP: lambda/2 * ||w - w_pretrained||^2 on the trained backbone, no decay there (0: off)")
    wise: Any = opt(
        None,
        "WiSE-FT after the last phase: [a, ...] in 0..1 between the head-only model (a=0) and the fine-tuned one "
        "(a=1), chosen by validation; true = [0,0.25,0.5,0.75,1]",
    )


@dataclass
class EarlyStopConfig:
    patience: int = opt(0, "end a phase after this many epochs without improvement (0: off)")
    monitor: str = opt("val/acc", "val/acc | val/f1 | val/auroc | val/loss")


@dataclass
class SpeedConfig:
    channels_last: bool = opt(True, "NHWC convolutions (faster on recent GPUs and CPUs)")
    compile: bool = opt(False, "torch.compile the model (first epoch pays the compilation)")


@dataclass
class LogConfig:
    images_every_n_epochs: int = opt(1, "confusion matrix, error images, PR curve every N epochs (0: off)")
    max_images: int = opt(16, "images per TensorBoard grid")
    mlflow: bool = opt(False, "also log params, metrics and the best checkpoint to MLflow (pip install -e '.[mlflow]')")
    mlflow_uri: str | None = opt(None, "MLflow tracking URI (null: the local folder <out_dir>/mlruns)")


@dataclass
class EvalConfig:
    temperature: str = opt(
        "auto",
        "auto: keep a fitted temperature only when validation supports it and it lowers NLL without raising "
        "ECE | fit: keep any finite fit (clamped to 0.05..20) | off: T=1",
    )
    # auto: the 16 shifted copies of the test set cost ~16 evaluations, seconds on a GPU but many
    # minutes on a CPU, so a CPU run asks for them explicitly (pipeline/shift_report.py)
    shifts: Any = opt(
        "auto",
        "shift report on the test split: auto (all shifts on a GPU, none on CPU) | all | none | "
        "[lowres,jpeg,blur,noise,brightness,contrast,grayscale,rotation] (each at 2 severities)",
    )
    shift_seed: int = opt(0, "seed of the shifts' per-image randomness (not `seed`: repeats see the same shifts)")
    extra_tests: list[str] = opt([], "more test folders, [name=path,...], each <path>/<class>/<images>: clean metrics")


@dataclass
class LrFindConfig:
    min_lr: float = opt(1e-7, "stage=lr_find: lowest rate of the range test")
    max_lr: float = opt(1.0, "stage=lr_find: highest rate of the range test")
    num_steps: int = opt(100, "stage=lr_find: training steps (at most one epoch)")


@dataclass
class AllConfig:
    epochs: list[int] | None = opt(
        None, "stage=all: [features, frozen, finetune] epochs (null: trainer.max_epochs, else presets)"
    )


TRAINER_DEFAULTS = {
    "max_epochs": 30,
    "accelerator": "auto",
    "devices": "auto",
    "precision": "auto",
    "log_every_n_steps": 10,
}


@dataclass
class RunConfig:
    stage: str = opt("finetune", "features | frozen | finetune | test | all | lr_find")
    seed: int = opt(42, "global seed")
    out_dir: str = opt("runs", "where runs go")
    ckpt_path: str | None = opt(None, "resume (a path, or 'last'); stage=test: the checkpoint to evaluate")
    slurm_requeue: bool = opt(
        False, "under SLURM: Lightning's auto-requeue (hpc_ckpt_N.ckpt); off: a requeued job resumes its last.ckpt"
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
    # Free-form on purpose: every key is passed to lightning.Trainer and checked against its signature.
    trainer: dict[str, Any] = opt(TRAINER_DEFAULTS, "any lightning.Trainer argument")


def _choice(value: str, choices: tuple[str, ...] | list[str], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")


def _trainer_keys() -> set[str]:
    from lightning.pytorch import Trainer

    return set(inspect.signature(Trainer.__init__).parameters) - {"self", "callbacks", "logger"}


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    msg = str(getattr(err, "msg", err)).splitlines()[0]
    if "not in" in msg or "Key '" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.structured(RunConfig)
        if parent:
            node = OmegaConf.select(node, parent)
        valid = ", ".join(f"{parent + '.' if parent else ''}{k}" for k in node.keys())
        return f"unknown config key '{key}'; valid keys here: {valid}"
    return f"bad value for '{key}': {msg}"


def _read_yaml(path: Path) -> DictConfig:
    return OmegaConf.load(path) if path.is_file() else OmegaConf.create({})


def cache_dir(cfg: DictConfig) -> str:
    """``data.cache_dir``, or ``<out_dir>/cache``: feature, decoded-image, scan and split caches."""
    return cfg.data.cache_dir or str(Path(cfg.out_dir) / "cache")


def flatten_keys(node: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: nested config values under their dotted keys."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out |= flatten_keys(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_overrides(argv: list[str]) -> DictConfig:
    bad = [a for a in argv if "=" not in a or a.startswith("=")]
    if bad:
        raise ConfigError(f"arguments must look like key=value, got: {' '.join(bad)} (see --help)")
    try:
        return OmegaConf.from_dotlist(list(argv))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides: {str(err).splitlines()[0]}") from None


def load_config(argv: list[str], config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Compose the run configuration from the presets and ``key=value`` overrides."""
    cli = parse_overrides(argv)
    schema = OmegaConf.structured(RunConfig)
    try:
        stage = str(cli.get("stage", schema.stage))
        _choice(stage, STAGES, "stage")
        cfg = OmegaConf.merge(schema, _read_yaml(config_dir / "stage" / f"{stage}.yaml"))
        backbone = str(OmegaConf.select(cli, "model.backbone", default=cfg.model.backbone))
        per_backbone = [
            _read_yaml(config_dir / "backbone" / f"{backbone}{suffix}.yaml") for suffix in ("", f".{stage}")
        ]
        cfg = OmegaConf.merge(cfg, *per_backbone, cli)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    shorthand = [k for k in ("warmup_epochs", "unfreeze_blocks") if OmegaConf.select(cli, f"finetune.{k}") is not None]
    if shorthand and OmegaConf.select(cli, "finetune.milestones") is not None:
        raise ConfigError(
            f"give either finetune.milestones or finetune.{'/'.join(shorthand)}, not both (milestones replace them)"
        )
    cfg.finetune.wise = wise_alphas(cfg.finetune.wise)
    if shorthand:  # the command line's one-step schedule replaces a preset's milestones
        cfg.finetune.milestones = None
    validate(cfg)
    return cfg


WISE_DEFAULT = (0.0, 0.25, 0.5, 0.75, 1.0)


def wise_alphas(value: Any) -> list[float] | None:
    """``finetune.wise``: null/false = off, true = ``WISE_DEFAULT``, or a list of mixing weights in 0..1."""
    if value is None or value is False:
        return None
    if value is True:
        return list(WISE_DEFAULT)
    values = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else None
    if (
        not values
        or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0.0 <= a <= 1.0 for a in values)
        or len(set(values)) != len(values)
    ):
        raise ConfigError(
            f"finetune.wise must be true, null or distinct mixing weights in 0..1 (e.g. [0,0.5,1]), got {value}"
        )
    return sorted(float(a) for a in values)


def validate(cfg: DictConfig) -> None:
    """Check what the schema's types cannot: choices, ranges and ``trainer.*`` keys."""
    from lightning_modules.backbones import BackboneError, backbone_spec

    _choice(cfg.stage, STAGES, "stage")
    try:
        backbone_spec(cfg.model.backbone)  # a timm:<name> is built once here (random weights) and cut
    except BackboneError as err:
        raise ConfigError(str(err)) from None
    _choice(cfg.data.augment, AUGMENTS, "data.augment")
    _choice(cfg.optim.name, OPTIMIZERS, "optim.name")
    _choice(cfg.optim.scheduler, SCHEDULERS, "optim.scheduler")
    _choice(cfg.early_stop.monitor, list(MONITORS), "early_stop.monitor")
    _choice(cfg.model.pool, POOLS, "model.pool")
    _choice(cfg.eval.temperature, TEMPERATURE_MODES, "eval.temperature")
    from datamodules.download import SOURCE_NAMES

    _choice(cfg.data.source, SOURCE_NAMES, "data.source")
    from datamodules.flat_folder import parse_split_sizes

    try:
        if cfg.data.split_sizes is not None:
            parse_split_sizes(list(cfg.data.split_sizes))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    folds, fold = cfg.data.folds, cfg.data.fold
    if folds is not None and folds < 2:
        raise ConfigError(f"data.folds must be at least 2 (or null: no cross-validation), got {folds}")
    if (folds is None) != (fold is None):
        raise ConfigError(
            "data.folds=K and data.fold=i go together: K folds, validation on fold i (0..K-1); "
            "sweep.data.fold=[0,1,...] runs every fold"
        )
    if folds is not None and not 0 <= fold < folds:
        raise ConfigError(f"data.fold must be in 0..{folds - 1} for data.folds={folds}, got {fold}")
    positive = {
        "data.image_size": cfg.data.image_size,
        "data.batch_size": cfg.data.batch_size,
        "optim.lr": cfg.optim.lr,
    }
    floats = {
        "optim.lr": cfg.optim.lr,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.lr_warmup_epochs": cfg.optim.lr_warmup_epochs,
        "optim.label_smoothing": cfg.optim.label_smoothing,
        "optim.ema_decay": cfg.optim.ema_decay,
        "finetune.backbone_lr_ratio": cfg.finetune.backbone_lr_ratio,
        "finetune.layer_decay": cfg.finetune.layer_decay,
        "model.dropout": cfg.model.dropout,
    }
    for key, value in floats.items():
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    non_negative = {
        "optim.weight_decay": cfg.optim.weight_decay,
        "finetune.warmup_epochs": cfg.finetune.warmup_epochs,
        "finetune.unfreeze_blocks": cfg.finetune.unfreeze_blocks,
        "finetune.backbone_lr_ratio": cfg.finetune.backbone_lr_ratio,
        "model.head_hidden": cfg.model.head_hidden,
        "optim.lr_warmup_epochs": cfg.optim.lr_warmup_epochs,
        "early_stop.patience": cfg.early_stop.patience,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be zero or positive, got {value}")
    if not (math.isfinite(cfg.finetune.l2sp) and cfg.finetune.l2sp >= 0):
        raise ConfigError(f"finetune.l2sp must be a finite number >= 0 (0: off), got {cfg.finetune.l2sp}")
    if not 0.0 <= cfg.optim.label_smoothing < 1.0:
        raise ConfigError(f"optim.label_smoothing must be in [0, 1), got {cfg.optim.label_smoothing}")
    weights = cfg.optim.class_weights
    if not (weights is None or weights == "auto" or OmegaConf.is_list(weights)):
        raise ConfigError(
            f"optim.class_weights must be auto, null or a list of weights (one per class), got {weights!r}"
        )
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay must be in [0, 1) (e.g. 0.999; 0: off), got {cfg.optim.ema_decay}")
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {cfg.model.dropout}")
    if cfg.data.train_per_class is not None and cfg.data.train_per_class < 1:
        raise ConfigError(f"data.train_per_class must be at least 1 (or null: all), got {cfg.data.train_per_class}")
    if cfg.data.num_workers is not None and cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be zero or positive, got {cfg.data.num_workers}")
    unknown = sorted(set(cfg.trainer) - _trainer_keys())
    if unknown:
        raise ConfigError(
            f"unknown trainer key(s) {', '.join('trainer.' + k for k in unknown)}; "
            "trainer.* must be arguments of lightning.Trainer (max_epochs, accelerator, devices, ...)"
        )
    max_epochs = cfg.trainer.get("max_epochs")
    if not isinstance(max_epochs, int) or isinstance(max_epochs, bool) or max_epochs < 1:
        raise ConfigError(f"trainer.max_epochs must be a whole number of at least 1, got {max_epochs}")
    for key in ("max_steps", "max_time", "min_steps", "min_epochs", "fast_dev_run"):
        if cfg.trainer.get(key) not in (None, -1, False):
            raise ConfigError(f"trainer.{key} is not supported: a stage's plan counts epochs (use trainer.max_epochs)")
    for key in ("limit_val_batches", "limit_test_batches"):
        if cfg.trainer.get(key, 1.0) not in (1.0, 0):
            raise ConfigError(
                f"trainer.{key}={cfg.trainer.get(key)} is not supported: the reported figures, the per-image "
                "predictions and the temperature cover the whole split (1.0) or none of it (0)"
            )
    if cfg.trainer.get("limit_train_batches") in (0, 0.0):
        raise ConfigError("trainer.limit_train_batches=0 would train nothing")
    if cfg.early_stop.patience > 0:
        for key, every_epoch in (("check_val_every_n_epoch", 1), ("val_check_interval", 1.0)):
            if cfg.trainer.get(key, every_epoch) != every_epoch:
                raise ConfigError(f"early_stop.patience needs one validation per epoch: remove trainer.{key}")
        if cfg.trainer.get("limit_val_batches") in (0, 0.0):
            raise ConfigError("early_stop.patience needs validation: trainer.limit_val_batches=0 turns it off")
    if cfg.all.epochs is not None and (len(cfg.all.epochs) != 3 or min(cfg.all.epochs) < 1):
        raise ConfigError(
            "all.epochs must be three epoch counts of at least 1 (features, frozen, finetune), "
            f"got {list(cfg.all.epochs)}"
        )
    if not 0 < cfg.lr_find.min_lr < cfg.lr_find.max_lr or cfg.lr_find.num_steps < 5:
        raise ConfigError("lr_find needs 0 < lr_find.min_lr < lr_find.max_lr and lr_find.num_steps >= 5")
    if cfg.stage in (*TRAINING_STAGES, "lr_find"):
        plan = plan_from_config(cfg)  # refuses a schedule that would not do what it says
        head_only = any(phase.top_blocks == 0 for phase in plan.phases)
        if (
            cfg.stage == "finetune"
            and cfg.finetune.wise
            and not head_only
            and not (cfg.model.pretrained or cfg.model.weights)
        ):
            raise ConfigError(
                "finetune.wise needs a theta_0: a head-only phase (finetune.warmup_epochs >= 1) or pretrained "
                "weights (model.pretrained=true or model.weights=...)"
            )
    from pipeline.shift_report import validate_shift_config

    validate_shift_config(cfg.eval)
    if cfg.log.images_every_n_epochs < 0 or cfg.log.max_images < 1:
        raise ConfigError("log.images_every_n_epochs must be >= 0 and log.max_images >= 1")
    if cfg.log.mlflow:
        from pipeline.mlflow_logging import check_available

        check_available()
    if cfg.stage == "test" and not cfg.ckpt_path:
        raise ConfigError("stage=test needs a checkpoint: add ckpt_path=PATH/TO/run/checkpoints/best.ckpt")


def plan_from_config(cfg: DictConfig) -> Plan:
    """The plan of a training stage (see ``lightning_modules/schedule.py``); ConfigError if it cannot run."""
    from lightning_modules.backbones import backbone_spec

    ft = cfg.finetune
    milestones = None
    if ft.milestones is not None:
        pairs = list(ft.milestones)
        if not pairs or any(len(p) != 2 or min(p) < 0 for p in pairs):
            raise ConfigError(
                f"finetune.milestones must be a non-empty list of [epoch, top_blocks] pairs of whole numbers >= 0, "
                f"got {OmegaConf.to_container(ft.milestones)}"
            )
    if cfg.stage == "finetune":
        milestones = milestones_from(ft.warmup_epochs, ft.unfreeze_blocks, ft.milestones)
    try:
        return build_plan(
            cfg.stage,
            int(cfg.trainer.max_epochs),
            backbone_spec(cfg.model.backbone).num_blocks,
            cfg.optim.lr,
            milestones=milestones,
            backbone_lr_ratio=ft.backbone_lr_ratio,
            layer_decay=ft.layer_decay,
            scheduler=cfg.optim.scheduler,
            lr_warmup_epochs=cfg.optim.lr_warmup_epochs,
        )
    except PlanError as err:
        raise ConfigError(str(err)) from None


def to_yaml(cfg: DictConfig, plan: Plan | None = None) -> str:
    """The resolved config; with ``plan``, followed by the plan as the run executed it."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    if plan is not None:
        text += "# The stage's schedule as executed (lightning_modules/schedule.py); not an input key.\n"
        text += OmegaConf.to_yaml({"plan": plan.to_dict()})
    return text


HELP = """\
usage: python train.py [key=value ...]

Staged transfer learning of an image classifier (PyTorch Lightning).

stages (stage=...):
  features   seed method 1: frozen backbone run once, features cached, head trained on them
  frozen     seed method 2: frozen backbone + augmentation, trained end to end
  finetune   seed method 3: head warm-up, then the top blocks unfrozen at a lower learning rate
  test       evaluate ckpt_path=... on the test split
  all        features, frozen, then finetune from the best frozen checkpoint; a comparison table
  lr_find    learning-rate range test on the head phase (backbone frozen): plot and suggested optim.lr

backbones (model.backbone=...):
  {backbones}
  timm:<name>  a timm CNN, e.g. timm:resnet50.a1_in1k (families resnet*, convnext*, efficientnet*,
               mobilenetv3*, regnet*; needs pip install -e '.[timm]')

keys (defaults from the schema in pipeline/config.py; presets in configs/stage/ and configs/backbone/):
{keys}

repeats and sweeps (around any stage; see README, "Repeats, sweeps and intervals"):
  seeds=[1,2,3]                      run once per seed; summary.md with mean, sd and 95% interval
  sweep.<key>=[a,b,...]              run every value of any key (combined with seeds: the full grid);
                                     the same command again continues an interrupted sweep

example:
  python train.py stage=finetune data.root=path/to/cats_and_dogs_small model.backbone=efficientnet_lite0
"""


def _key_lines(schema: type, prefix: str = "") -> list[str]:
    lines = []
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
            lines += _key_lines(globals()[f.type] if isinstance(f.type, str) else f.type, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name == "trainer":
            default = " ".join(f"trainer.{k}={v}" for k, v in default.items())
            lines.append(f"  trainer.*  {f.metadata['help']}; defaults: {default}")
            continue
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        lines.append(f"  {prefix}{f.name}={shown}  {f.metadata['help']}")
    return lines


def help_text() -> str:
    from lightning_modules.backbones import BACKBONES

    return HELP.format(backbones=", ".join(sorted(BACKBONES)), keys="\n".join(_key_lines(RunConfig)))
