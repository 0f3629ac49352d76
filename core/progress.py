"""Progress of a long loop over images: a tqdm bar on a terminal, a line per ~10% in a file.

A redirected run (``python train.py > log``) should read well: tqdm there writes a carriage-return
update per refresh into the file. Off a terminal a :class:`Progress` prints a plain line each time
another tenth of the images is done, with the images/s and the time left.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

from core.rank import is_rank_zero

LINES = 10  # lines per loop off a terminal (one per ~10%)
QUIET_S = 5.0  # off a terminal, a loop shorter than this prints nothing (a toy run stays a few lines)


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stdout, where Lightning's bar writes) is a terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def duration(seconds: float) -> str:
    """``1:02:03``, ``2:03``: as tqdm writes elapsed and remaining times."""
    return tqdm.format_interval(max(0.0, seconds))


def rate_line(desc: str, done: int, total: int, elapsed: float, unit: str = "images") -> str:
    """``desc: done/total images (p%), r images/s, elapsed e, remaining r``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    remaining = (total - done) / rate if rate > 0 else 0.0
    share = f" ({100 * done / total:.0f}%)" if total else ""
    return (
        f"{desc}: {done}/{total} {unit}{share}, {rate:.1f} {unit}/s, "
        f"elapsed {duration(elapsed)}, remaining {duration(remaining)}"
    )


class Progress:
    """``update(n)`` after every batch of ``n`` images; ``close()`` at the end (or use ``with``).
    On a terminal (stderr) a tqdm bar that disappears when done; elsewhere, once ``QUIET_S`` have
    passed, a line on stderr per ``1/LINES`` of the images and the last one at ``close``; nothing
    on ranks other than zero, or with ``enabled=False``."""

    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "images"):
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled = enabled and is_rank_zero() and total > 0
        on_terminal = self.enabled and is_terminal(sys.stderr)
        self.bar = tqdm(total=total, desc=desc, unit="img", leave=False) if on_terminal else None
        self.done, self.started, self._next_line = 0, time.perf_counter(), total / LINES
        self._printed = 0  # images done at the last line printed

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.done >= self._next_line:
            self._next_line = (int(self.done / self.total * LINES) + 1) * self.total / LINES
            if time.perf_counter() - self.started >= QUIET_S:
                self._print()

    def _print(self) -> None:
        self._printed = self.done
        print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        return rate_line(self.desc, self.done, self.total, time.perf_counter() - self.started, self.unit)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.done and self._printed != self.done:
            if time.perf_counter() - self.started >= QUIET_S:
                self._print()
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
