"""The one base of every error a user can act on: a one-line message and the process's exit code.

``train.py`` and ``predict.py`` print ``error: <message>`` for any ``UserError`` and exit with its
``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable


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


def first_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one line: its message's first line (its type's name when it has none)."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]


FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def os_error_line(err: OSError, with_file: bool = True) -> str:
    """An operating-system error (a full disk, EIO, a read-only folder) as one line with what to do.

    These reach the entry points from anywhere a file is read or written, a library's writer
    included (TensorBoard's event file, a data loader), so they are described here once."""
    name = errno.errorcode.get(err.errno or 0, "")
    text = f"{err.strerror or first_line(err)}" + (f" ({name})" if name else "")
    where = f": {err.filename}" if err.filename and with_file else ""
    if err.errno in FULL_DISK:
        advice = "free some space or point the run at another folder (out_dir=, data.cache_dir=)"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        advice = "choose a folder this user can write to"
    else:
        advice = "the operating system failed a read or write; check the disk or mount"
    return f"{text}{where}; {advice}"


def os_error_cause(err: BaseException) -> OSError | None:
    """The operating-system error that ``err`` is, or was raised from (``raise ... from``): libraries
    re-raise them as their own types (Lightning's TensorBoard logger turns a failed event write into a
    ``ValueError`` "you tried to log 1.0 ..."), which would hide a full disk behind a traceback."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None


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


def not_a_choice(key: str, value: object, choices: Iterable[object], also: str = "") -> ConfigError:
    """The one wording of "``key=value`` is not one of the choices" (``also``: what else is accepted)."""
    return ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}{also}")
