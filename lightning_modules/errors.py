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
