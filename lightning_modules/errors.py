"""The one base of every error a user can act on: a one-line message and the process's exit code.

``train.py`` and ``predict.py`` print ``error: <message>`` for any ``UserError`` and exit with its
``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


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
