"""Composing a run's configuration from its layers, without checking it (no torch, no Lightning):
the schema's defaults -> ``configs/stage/<stage>.yaml`` -> ``configs/backbone/<backbone>.yaml`` ->
``configs/backbone/<backbone>.<stage>.yaml`` (each if present) -> the command line. ``load.py``
checks the result; ``usage.py`` shows it, layer by layer (``--show-config``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml  # omegaconf's own YAML parser (a dependency of it)
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.errors import ConfigError, first_line
from pipeline.config.schema import RunConfig, check_value

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # the repository's configs/
COMMAND_LINE = "command line"


def compose(argv: list[str], config_dir: Path = CONFIG_DIR) -> tuple[DictConfig, list[tuple[str, DictConfig]]]:
    """The merged configuration and its layers after the schema, ``(name, values)`` in merge order
    (the presets by file name, then the command line)."""
    cli = parse_overrides(argv)
    if not (config_dir / "stage").is_dir():  # every stage has a preset: a missing folder is an install fault
        raise ConfigError(f"the stage presets are missing: no folder {config_dir / 'stage'}")
    schema = OmegaConf.structured(RunConfig)
    try:
        stage = str(cli.get("stage", schema.stage))
        check_value("stage", stage)  # before it names a preset file
        stage_file = config_dir / "stage" / f"{stage}.yaml"
        layers = [(stage_file, _read_yaml(stage_file))]
        staged = OmegaConf.merge(schema, layers[0][1])
        backbone = str(OmegaConf.select(cli, "model.backbone", default=staged.model.backbone))
        for suffix in ("", f".{stage}"):
            path = config_dir / "backbone" / f"{backbone}{suffix}.yaml"
            layers.append((path, _read_yaml(path)))
        cfg = OmegaConf.merge(schema, *(values for _, values in layers), cli)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    named = [(str(path.relative_to(config_dir.parent)), values) for path, values in layers if path.is_file()]
    return cfg, [*named, (COMMAND_LINE, cli)]


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
    """A preset file (empty where there is none); a broken one is one ConfigError line naming the
    file and, for a syntax error, where YAML stopped."""
    if not path.is_file():
        return OmegaConf.create({})
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} cannot be read: {err}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path} is not a mapping of config keys (e.g. 'model:' with 'backbone: vgg16' below)")
    return node


def flatten_keys(node: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: nested config values under their dotted keys."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:  # an empty mapping (sweep={}) is a value of its own
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
        raise ConfigError(f"cannot parse overrides: {first_line(err)}") from None


