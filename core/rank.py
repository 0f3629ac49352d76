"""Which process writes the files that all processes of a run share."""

from __future__ import annotations

import os

from lightning_utilities.core.rank_zero import rank_zero_only

# Lightning's own order (lightning/fabric/utilities/rank_zero.py, _get_rank): LOCAL_RANK before
# SLURM_PROCID, which SLURM sets even when it does not manage the processes.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_rank_zero() -> bool:
    """Global rank zero, the one process that writes shared files. The rank is Lightning's, which it
    reads from the launcher's environment when imported and sets again when a strategy starts; a
    process that has not imported Lightning (one that only claims a run folder) reads the same
    environment by the same rule, so this module stays light."""
    rank = getattr(rank_zero_only, "rank", None)
    if rank is None:
        rank = next((int(os.environ[key]) for key in _RANK_VARIABLES if os.environ.get(key) is not None), 0)
    return rank == 0
