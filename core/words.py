"""Counts in sentences: "1 epoch", "3 epochs"."""

from __future__ import annotations


def count(n: float, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1 (``plural``: an irregular plural)."""
    return f"{n:g} {noun if n == 1 else plural or noun + 's'}"


def epoch_range(start: int, end: int) -> str:
    """Epochs ``start`` to ``end - 1``: ``epoch 0``, ``epochs 1-3``."""
    return f"epoch {start}" if end - start == 1 else f"epochs {start}-{end - 1}"
