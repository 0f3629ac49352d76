"""The one base of every error a user can act on: a one-line message and the process's exit code.

``train.py`` and ``predict.py`` print ``error: <message>`` for any ``UserError`` and exit with its
``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class UserError(Exception):
    """A mistake in the input or the environment that the user can fix; the message is one line."""

    exit_code = 2


class DiskFullError(UserError, OSError):
    """A write ran out of space (or hit a file-size limit); its temporary file is already removed."""


class IdentityError(UserError):
    """A checkpoint's recorded identity (data, classes, preprocessing) differs from this run's."""


class ConfigError(UserError, ValueError):
    """A problem with the run's configuration (a key, a value, a checkpoint named by one)."""


class RunInterrupted(UserError, RuntimeError):
    """SIGINT/SIGTERM stopped a fit after its state was saved; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def load_problem(path: str | os.PathLike, err: BaseException) -> str:
    """What ``torch.load`` (or safetensors) failing on ``path`` means, as the end of one complete
    line: ``cannot be loaded safely ...`` where ``weights_only`` refused a pickled object, else
    ``is truncated or corrupt (N bytes): ...`` (a copy cut short, a damaged or foreign file)."""
    text = str(err)
    if "Weights only load failed" in text:  # torch's refusal: the useful sentence is the unpickler's
        rest = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
        line = next((x for x in rest.splitlines() if x.strip()), "")
        detail = _first_sentence(line) or "a pickled object it does not allow"
        return f"cannot be loaded safely with weights_only=True ({detail})"
    try:
        size = f"{os.path.getsize(path)} bytes"
    except OSError:
        size = "size unknown"
    if "mmap can only be used" in text:  # torch's wording for a file that is not a zip archive at all
        detail = "not a zip archive as torch.save writes"
    elif isinstance(err, RuntimeError):  # torch's own reader: its first sentence says what is wrong
        detail = _first_sentence(text) or type(err).__name__
    else:  # the unpickler ran out of data (EOFError) or read garbage (KeyError, UnpicklingError)
        detail = " ".join(filter(None, (type(err).__name__, _first_sentence(text))))
    return f"is truncated or corrupt ({size}): {detail}"


def _first_sentence(text: str) -> str:
    """The first sentence of an exception's text: whole, on one line."""
    first = " ".join(text.split())
    return first.split(". ", 1)[0].rstrip(".")
