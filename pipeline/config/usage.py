"""``python train.py --help``: generated from the schema, each key with its default, choices and range.

Imports only the schema (no torch, no Lightning), so ``--help`` answers at once.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.config.fields import parse_range
from pipeline.config.schema import STAGE_HELP, TRAINER_HELP, SchemaRow, schema_rows

HELP = """\
usage: python train.py [key=value ...]

Staged transfer learning of an image classifier (PyTorch Lightning).

stages (stage=...):
{stages}

keys (key=default  meaning; choices or range; schema: pipeline/config/schema.py;
presets: configs/stage/, configs/backbone/):
{keys}

example:
  python train.py stage=finetune data.root=path/to/cats_and_dogs_small model.backbone=efficientnet_lite0
"""


def shown(value: Any) -> str:
    """A value as it is written on the command line (OmegaConf's dotlist): null, true/false, [a,b],
    a path as its text. The one place that writes values as overrides (--help, the API, sweeps)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(shown(v) for v in value) + "]"
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def key_line(row: SchemaRow) -> str:
    """``  key=default  help; choices: a | b`` or ``...; range: >= 0`` (of a list: of each number)."""
    line = f"  {row.key}={shown(row.default)}  {row.help}"
    if row.choices or row.other:
        line += "; choices: " + " | ".join([*row.choices, *([row.other] if row.other else [])])
    if row.range:
        each = " (each number)" if row.type.startswith("list") else ""
        line += f"; range{each}: {parse_range(row.range).short()}"
    return line


def help_text() -> str:
    rows = schema_rows()
    trainer = [r for r in rows if r.key.startswith("trainer.")]
    lines = [key_line(r) for r in rows if r not in trainer]
    defaults = " ".join(f"{r.key}={shown(r.default)}" for r in trainer)
    lines.append(f"  trainer.*  {TRAINER_HELP}; defaults: {defaults}")
    width = max(map(len, STAGE_HELP))
    stages = "\n".join(f"  {name:<{width}} {text}" for name, text in STAGE_HELP.items())
    return HELP.format(stages=stages, keys="\n".join(lines))


def show_config(argv: list[str]) -> str:
    """``python train.py stage=S model.backbone=B ... --show-config`` (or ``--help`` after keys): every
    key with the value this run will use, and, where a preset or the command line set it, which.
    Values that depend on the backbone's weights (``data.image_size=null``) are resolved when the
    run starts and shown as null here."""
    from omegaconf import OmegaConf

    from pipeline.config.compose import compose, flatten_keys

    cfg, layers = compose(argv)
    source: dict[str, str] = {}
    for name, values in layers:
        for key in flatten_keys(OmegaConf.to_container(values)):
            source[key] = name
    values = flatten_keys(OmegaConf.to_container(cfg, resolve=True))
    width = max(len(f"{k}={shown(v)}") for k, v in values.items())
    lines = [f"configuration of: python train.py {' '.join(argv)}", "(key=value   where it was set; else the default)"]
    for key, value in values.items():
        text = f"{key}={shown(value)}"
        lines.append(f"  {text:<{width}}   {source[key]}" if key in source else f"  {text}")
    return "\n".join(lines)


PREDICT_HELP = """\
usage: python predict.py ckpt_path=PATH inputs=PATH_OR_GLOB [key=value ...]
       python predict.py ckpt_path=PATH export=onnx|torchscript [export_path=...]

Classify image files with a trained checkpoint (its backbone, classes, preprocessing and temperature
come with it), or export it.

keys (key=default  meaning; choices or range; schema: pipeline/config/schema.py PredictConfig):
{keys}
"""


def predict_help_text() -> str:
    """``python predict.py --help`` (and a bare ``predict.py``), generated from its schema."""
    from pipeline.config.schema import PredictConfig

    return PREDICT_HELP.format(keys="\n".join(key_line(row) for row in schema_rows(PredictConfig)))
