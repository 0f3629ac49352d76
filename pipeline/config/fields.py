"""The declaration of one config key, and the generic check of its value against it.

:func:`opt` stores a key's help, choices and range in its dataclass field's metadata (the schema,
``pipeline/config/schema.py``, is made of such fields); :func:`check_key` checks a value against them
with one-line ConfigErrors, so no single-key rule is written by hand. Light on purpose (no torch):
``--help`` reads the same declarations.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any, NamedTuple, get_args, get_type_hints

from omegaconf import OmegaConf

from core.errors import ConfigError, not_a_choice


class Range(NamedTuple):
    """An interval as written in mathematics, e.g. ``[0, 1)`` or ``(0, inf)``."""

    low: float
    high: float
    low_open: bool
    high_open: bool
    text: str

    def __contains__(self, x: object) -> bool:
        if not isinstance(x, (int, float)) or isinstance(x, bool):
            return False
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def phrase(self) -> str:
        """The error message's wording: ``positive``, ``zero or positive``, ``at least 2``, ``in [0, 1)``."""
        if self.high != math.inf:
            return f"in {self.text}"
        if self.low == 0:
            return "positive" if self.low_open else "zero or positive"
        return f"greater than {_num(self.low)}" if self.low_open else f"at least {_num(self.low)}"

    def short(self) -> str:
        """``--help``'s wording: ``> 0``, ``>= 1``, ``[0, 1)``."""
        if self.high != math.inf:
            return self.text
        return f"{'>' if self.low_open else '>='} {_num(self.low)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def parse_range(text: str) -> Range:
    """``"[0, 1)"`` -> Range; a malformed interval fails at import, where the schema declares it."""
    if text[:1] not in ("[", "(") or text[-1:] not in ("]", ")") or text.count(",") != 1:
        raise ValueError(f"not an interval: {text!r}")
    low, high = (part.strip() for part in text[1:-1].split(","))
    return Range(float(low), float(high), text[0] == "(", text[-1] == ")", text)


def opt(
    default: Any,
    help: str,  # noqa: A002 - the field's help text
    *,
    choices: tuple[str, ...] = (),
    other: str = "",
    lists: bool = False,
    range: str | None = None,  # noqa: A002 - an interval, e.g. "[0, 1)"
    length: int | None = None,
    pairs: bool = False,
    shape: str = "",
) -> Any:
    """A schema field: its default and its facts for ``--help`` and :func:`check_value`.

    ``choices``: the valid strings; ``other``: what else is valid, described for ``--help`` and
    checked by the module that implements the key (``pipeline.config.load.validate``), not here;
    ``lists``: a list is valid besides the choices. ``range``: every number (of a list: every
    element) lies in this interval. ``length`` / ``pairs``: a non-empty list of that many numbers /
    of ``[a, b]`` pairs, described by ``shape`` in the error message."""
    meta = {
        "help": help,
        "choices": tuple(choices),
        "other": other,
        "lists": lists,
        "range": parse_range(range) if range else None,
        "length": length,
        "pairs": pairs,
        "shape": shape,
    }
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class Key(NamedTuple):
    """A leaf of the schema: its dotted name, its dataclass field and its resolved type."""

    name: str
    field: dataclasses.Field
    type: Any

    @property
    def meta(self) -> Any:
        return self.field.metadata

    @property
    def default(self) -> Any:
        f = self.field
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    @property
    def nullable(self) -> bool:
        return self.type is Any or type(None) in get_args(self.type)


def leaf_keys(schema: type, prefix: str = "") -> list[Key]:
    """The leaves of a (nested) dataclass schema, in declaration order, under their dotted names."""
    out = []
    hints = get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(Key(prefix + f.name, f, hints[f.name]))
    return out


def check_key(key: Key, value: Any) -> None:
    """A value against its key's declaration (choices, a finite number, list shape, range); a
    one-line ConfigError. Keys declared with ``other`` are checked by their module instead."""
    name, meta = key.name, key.meta
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if value is None or meta["other"] or isinstance(value, dict):
        return
    if meta["choices"]:
        if not (meta["lists"] and isinstance(value, list)) and value not in meta["choices"]:
            also = ", null or a list" if meta["lists"] else ""
            raise not_a_choice(name, value, meta["choices"], also)
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    rng = meta["range"]
    if meta["shape"]:
        leaves = [x for pair in value for x in (pair if isinstance(pair, list) else [pair])]
        ok = (
            bool(value)
            and (meta["length"] is None or len(value) == meta["length"])
            and (not meta["pairs"] or all(isinstance(p, list) and len(p) == 2 for p in value))
            and (rng is None or all(x in rng for x in leaves))
        )
        if not ok:
            raise ConfigError(f"{name} must be {meta['shape']}, got {value}")
    elif rng is not None and value not in rng:
        raise ConfigError(f"{name} must be {rng.phrase()}{' (or null)' if key.nullable else ''}, got {value}")
