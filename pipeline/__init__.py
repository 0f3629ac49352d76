"""The runner layer; ``from pipeline import run, load_model, predict`` is the Python API
(``pipeline/api.py``) and ``show_batch``, ``top_losses``, ``confusion_matrix`` its notebook figures
(``pipeline/notebook.py``), imported on first use so that ``train.py --help`` stays light."""

from importlib import import_module
from typing import Any

_MODULES = {"load_model": "api", "predict": "api", "run": "api"} | dict.fromkeys(
    ("show_batch", "top_losses", "confusion_matrix"), "notebook"
)
__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    if name in _MODULES:  # heavy (torch, Lightning): only when the API is used
        return getattr(import_module(f"pipeline.{_MODULES[name]}"), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
