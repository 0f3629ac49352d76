"""The run configuration: a typed schema, YAML presets and ``key=value`` overrides.

Composition order: ``configs/base.yaml`` -> ``configs/stage/<stage>.yaml`` ->
``configs/backbone/<backbone>.yaml`` -> ``configs/backbone/<backbone>.<stage>.yaml`` (each if
present) -> command line. The schema is an OmegaConf
structured config, so an unknown key or a wrong type fails while merging; choices that a type
cannot express (stage, backbone, optimizer, ...) are checked in :func:`validate`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

STAGES = ("features", "frozen", "finetune", "test", "all")
AUGMENTS = ("none", "seed", "standard")
OPTIMIZERS = ("rmsprop", "adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine")
POOLS = ("avg", "flatten")


class ConfigError(ValueError):
    """A problem with the run's configuration; its message is one line meant for the user."""


@dataclass
class DataConfig:
    root: str = "data/cats_and_dogs_small"
    image_size: int = 150
    batch_size: int = 20
    num_workers: int | None = None
    augment: str = "seed"
    cache_dir: str | None = None
    skip_bad_files: bool = True
    decoded_cache: bool = False  # decode + resize every image once into a memory-mapped file
    source: str = "kaggle_cats_vs_dogs"  # used only when data.root has no train/ folder
    url: str | None = None  # overrides the source's download address (a mirror, file://...)
    sha256: str | None = "auto"  # auto: the source's known checksum; null: no check
    split_sizes: list[int] = field(default_factory=lambda: [1000, 500, 500])


@dataclass
class ModelConfig:
    backbone: str = "vgg16"
    pretrained: bool = True
    weights: str | None = None
    pool: str = "avg"
    head_hidden: int = 256
    dropout: float = 0.5
    tta_flip: bool = False  # evaluate each image and its mirror, average the logits


@dataclass
class OptimConfig:
    name: str = "rmsprop"
    lr: float = 2e-5
    weight_decay: float = 0.0
    scheduler: str = "none"
    label_smoothing: float = 0.0


@dataclass
class FinetuneConfig:
    warmup_epochs: int = 0
    unfreeze_blocks: int = 1
    backbone_lr_ratio: float = 1.0
    train_bn: bool = False
    init_ckpt: str | None = None


@dataclass
class SpeedConfig:
    channels_last: bool = True  # NHWC memory format for convolutions (faster on recent GPUs and CPUs)
    compile: bool = False  # torch.compile the model (opt-in)


@dataclass
class LogConfig:
    images_every_n_epochs: int = 1  # confusion matrix, error images, PR curve; 0 = never
    max_images: int = 16


@dataclass
class AllConfig:
    epochs: list[int] | None = None  # stage=all: max_epochs of features, frozen, finetune


@dataclass
class RunConfig:
    stage: str = "finetune"
    seed: int = 42
    out_dir: str = "runs"
    ckpt_path: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    log: LogConfig = field(default_factory=LogConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    all: AllConfig = field(default_factory=AllConfig)
    # Free-form on purpose: every key is passed to lightning.Trainer and checked against its signature.
    trainer: dict[str, Any] = field(default_factory=dict)


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
        base = OmegaConf.merge(schema, _read_yaml(config_dir / "base.yaml"))
        stage = str(cli.get("stage", base.stage))
        _choice(stage, STAGES, "stage")
        cfg = OmegaConf.merge(base, _read_yaml(config_dir / "stage" / f"{stage}.yaml"))
        backbone = str(OmegaConf.select(cli, "model.backbone", default=cfg.model.backbone))
        per_backbone = [
            _read_yaml(config_dir / "backbone" / f"{backbone}{suffix}.yaml") for suffix in ("", f".{stage}")
        ]
        cfg = OmegaConf.merge(cfg, *per_backbone, cli)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Check what the schema's types cannot: choices, ranges and ``trainer.*`` keys."""
    from lightning_modules.backbones import BACKBONES

    _choice(cfg.stage, STAGES, "stage")
    _choice(cfg.model.backbone, sorted(BACKBONES), "model.backbone")
    _choice(cfg.data.augment, AUGMENTS, "data.augment")
    _choice(cfg.optim.name, OPTIMIZERS, "optim.name")
    _choice(cfg.optim.scheduler, SCHEDULERS, "optim.scheduler")
    _choice(cfg.model.pool, POOLS, "model.pool")
    from datamodules.download import SOURCE_NAMES

    _choice(cfg.data.source, SOURCE_NAMES, "data.source")
    if len(cfg.data.split_sizes) != 3 or min(cfg.data.split_sizes) < 1:
        raise ConfigError(
            f"data.split_sizes must be three positive counts (train, validation, test), "
            f"got {list(cfg.data.split_sizes)}"
        )
    positive = {
        "data.image_size": cfg.data.image_size,
        "data.batch_size": cfg.data.batch_size,
        "optim.lr": cfg.optim.lr,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    non_negative = {
        "optim.weight_decay": cfg.optim.weight_decay,
        "finetune.warmup_epochs": cfg.finetune.warmup_epochs,
        "finetune.unfreeze_blocks": cfg.finetune.unfreeze_blocks,
        "finetune.backbone_lr_ratio": cfg.finetune.backbone_lr_ratio,
        "model.head_hidden": cfg.model.head_hidden,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be zero or positive, got {value}")
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {cfg.model.dropout}")
    if cfg.data.num_workers is not None and cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be zero or positive, got {cfg.data.num_workers}")
    unknown = sorted(set(cfg.trainer) - _trainer_keys())
    if unknown:
        raise ConfigError(
            f"unknown trainer key(s) {', '.join('trainer.' + k for k in unknown)}; "
            "trainer.* must be arguments of lightning.Trainer (max_epochs, accelerator, devices, ...)"
        )
    n_blocks = BACKBONES[cfg.model.backbone].num_blocks
    if cfg.finetune.unfreeze_blocks > n_blocks:
        raise ConfigError(
            f"finetune.unfreeze_blocks={cfg.finetune.unfreeze_blocks} but {cfg.model.backbone} "
            f"has only {n_blocks} blocks"
        )
    if cfg.all.epochs is not None and (len(cfg.all.epochs) != 3 or min(cfg.all.epochs) < 1):
        raise ConfigError(
            f"all.epochs must be three positive epoch counts (features, frozen, finetune), got {list(cfg.all.epochs)}"
        )
    if cfg.log.images_every_n_epochs < 0 or cfg.log.max_images < 1:
        raise ConfigError("log.images_every_n_epochs must be >= 0 and log.max_images >= 1")
    if cfg.stage == "test" and not cfg.ckpt_path:
        raise ConfigError("stage=test needs a checkpoint: add ckpt_path=PATH/TO/run/checkpoints/best.ckpt")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


HELP = """\
usage: python train.py [key=value ...]

Staged transfer learning of an image classifier (PyTorch Lightning).

stages (stage=...):
  features   seed method 1: frozen backbone run once, features cached, head trained on them
  frozen     seed method 2: frozen backbone + augmentation, trained end to end
  finetune   seed method 3: head warm-up, then the top blocks unfrozen at a lower learning rate
  test       evaluate ckpt_path=... on the test split
  all        features, frozen, then finetune from the best frozen checkpoint; a comparison table

backbones (model.backbone=...):
  {backbones}

main keys (defaults from configs/base.yaml; stage presets in configs/stage/):
  seed, out_dir, ckpt_path (a path, or 'last' to resume the latest run of this stage+backbone)
  data.root, data.image_size, data.batch_size (per device), data.num_workers,
  data.source (download when data.root has no train/), data.url, data.sha256, data.split_sizes,
  data.augment ({augments}), data.cache_dir, data.skip_bad_files (false: unreadable images are an error)
  model.backbone, model.pretrained, model.weights, model.pool ({pools}), model.head_hidden, model.dropout
  optim.name ({optims}), optim.lr (the head's), optim.weight_decay, optim.scheduler ({scheds})
  finetune.warmup_epochs, finetune.unfreeze_blocks, finetune.backbone_lr_ratio,
  finetune.train_bn, finetune.init_ckpt (start from a frozen run's checkpoint)
  log.images_every_n_epochs, log.max_images  TensorBoard images; all.epochs=[F,Z,T] for stage=all
  trainer.*  any lightning.Trainer argument: trainer.max_epochs, trainer.accelerator, trainer.devices,
             trainer.strategy, trainer.precision (auto: bf16/16-mixed on GPU, 32 on CPU), ...

example:
  python train.py stage=finetune data.root=path/to/cats_and_dogs_small model.backbone=efficientnet_lite0
"""


def help_text() -> str:
    from lightning_modules.backbones import BACKBONES

    return HELP.format(
        backbones=", ".join(sorted(BACKBONES)),
        augments="|".join(AUGMENTS),
        pools="|".join(POOLS),
        optims="|".join(OPTIMIZERS),
        scheds="|".join(SCHEDULERS),
    )
