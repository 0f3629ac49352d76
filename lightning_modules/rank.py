"""Which process writes the files that all processes of a run share."""

from __future__ import annotations

from lightning.fabric.utilities.rank_zero import rank_zero_only


def is_rank_zero() -> bool:
    """Global rank zero, the one process that writes shared files (Lightning reads the rank from the
    launcher's environment at import and sets it again when a strategy starts)."""
    return rank_zero_only.rank == 0
