"""The runner layer; ``from pipeline import run, load_model, predict`` is the Python API
(``pipeline/api.py``), imported on first use so that ``train.py --help`` stays light."""

from typing import Any

__all__ = ["load_model", "predict", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pipeline import api  # heavy (torch, Lightning): only when the API is used

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
