"""The Python API, for notebooks: the command line's config, validation, errors and outputs.

    from pipeline import run, load_model, predict
    metrics = run("finetune", data_root="photos/", model_backbone="efficientnet_lite0", seed=1)
    model = load_model(metrics["best_ckpt"])
    rows = predict(model, ["a.jpg", "b.jpg"])  # or a folder, or PIL images

``run`` takes the same ``key=value`` overrides as ``train.py``, as keyword arguments: dotted keys
(``**{"optim.lr": 1e-4}``) or the section and key joined by ``_`` (``optim_lr=1e-4``). It returns the
metrics that ``metrics.json`` holds and raises the command line's one-line errors (``UserError``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import is_dataclass
from typing import Any

import torch
from PIL import Image

from core.errors import ConfigError
from datamodules.image_folder import default_num_workers
from datamodules.transforms import backbone_eval_transform
from lightning_modules.classifier import TransferClassifier
from pipeline.config.load import RunConfig, load_config
from pipeline.config.usage import shown
from pipeline.console import quieted
from pipeline.prediction import collect_files, predict_files
from pipeline.prediction import load_model as _load_model
from pipeline.registry import stage_spec
from pipeline.runner.stages import run_stage
from pipeline.studies.launch import expand_launch
from pipeline.studies.repeats import grid_requested, run_grid
from pipeline.studies.search import run_search, search_requested

# data, model, optim, ..., early_stop, lr_find, trainer: the sections a keyword can start with
SECTIONS = tuple(
    sorted((k for k, v in vars(RunConfig()).items() if isinstance(v, dict) or is_dataclass(v)), key=len, reverse=True)
)


def run_argv(argv: list[str]) -> dict[str, Any]:
    """What ``train.py`` runs for ``argv``: a search, a sweep, ``stage=all`` or one stage."""
    if search_requested(argv):
        return run_search(argv)
    if grid_requested(argv):
        return run_grid(argv)
    argv = expand_launch(argv)
    cfg = load_config(argv)
    if cfg.launch.mode != "serial":
        raise ConfigError(
            f"launch={cfg.launch.mode} runs a study's cells (seeds=[...], sweep.<key>=[...]); this is one run"
        )
    spec = stage_spec(cfg.stage)
    return spec.run(argv, cfg) if spec.study else run_stage(cfg)


def run(stage: str, **overrides: Any) -> dict[str, Any]:
    """Run ``stage`` (any of ``pipeline.registry``'s: ``features``, ``finetune``, ``all``, ...) as
    ``python train.py stage=<stage> <overrides>`` would, with train.py's console (library notes it
    drops are dropped here too); returns its metrics."""
    with quieted():
        return run_argv([f"stage={stage}", *to_argv(overrides)])


def to_argv(overrides: dict[str, Any]) -> list[str]:
    """Keyword arguments as command-line overrides (``data_root="x"`` -> ``data.root=x``)."""
    return [f"{_dotted(key)}={shown(value)}" for key, value in overrides.items()]


def _dotted(key: str) -> str:
    if "." in key:
        return key
    for section in SECTIONS:  # longest first: early_stop_patience -> early_stop.patience
        if key.startswith(f"{section}_") and len(key) > len(section) + 1:
            return f"{section}.{key[len(section) + 1 :]}"
    return key  # a top-level key (seed, out_dir, ckpt_path, seeds, soup, ...); unknown ones fail in load_config


def load_model(ckpt_path: str | os.PathLike) -> TransferClassifier:
    """A trained checkpoint of this project, in eval mode on the CPU (backbone, classes, image
    size, test-time flip and temperature come from the checkpoint)."""
    return _load_model(os.fspath(ckpt_path))


def predict(
    model: TransferClassifier,
    images: str | os.PathLike | Sequence[str | os.PathLike | Image.Image],
    batch_size: int = 32,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """One dict per image: ``file`` (None for a PIL image), ``predicted`` (a class name, None if
    unreadable), ``probabilities`` ({class: p}) and ``error``. ``images``: a folder (searched
    recursively), a file, a glob, or a list of paths and PIL images."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(images, (str, os.PathLike)):
        images = collect_files(os.fspath(images))
    items = list(images)
    if any(not isinstance(i, (str, os.PathLike, Image.Image)) for i in items):
        raise ConfigError("predict: images must be paths or PIL images")
    paths = [os.fspath(i) for i in items if not isinstance(i, Image.Image)]
    by_path = {row[0]: row for row in predict_files(model, paths, batch_size, default_num_workers(), device)}
    pictures = [i for i in items if isinstance(i, Image.Image)]
    pil_probs = iter(_predict_pil(model, pictures, batch_size, device)) if pictures else iter(())
    out = []
    for item in items:
        if isinstance(item, Image.Image):
            probs = next(pil_probs)
            out.append(_row(model, None, probs.tolist(), ""))
        else:
            file, _, probs, error = by_path[os.fspath(item)]
            out.append(_row(model, file, probs, error))
    return out


def _row(model: TransferClassifier, file: str | None, probs: list[float], error: str) -> dict[str, Any]:
    if error:
        return {"file": file, "predicted": None, "probabilities": None, "error": error}
    best = max(range(len(probs)), key=probs.__getitem__)
    return {
        "file": file,
        "predicted": model.class_names[best],
        "probabilities": dict(zip(model.class_names, probs)),
        "error": "",
    }


@torch.inference_mode()
def _predict_pil(model: TransferClassifier, pictures: list[Image.Image], batch_size: int, device: str) -> torch.Tensor:
    """Probabilities of in-memory images, resized as the loaders resize decoded files."""
    size = int(model.hparams.image_size)
    transform = backbone_eval_transform(model.backbone, size)
    model.eval().to(device)
    batches = []
    for start in range(0, len(pictures), batch_size):
        chunk = torch.stack([transform(p.convert("RGB")) for p in pictures[start : start + batch_size]])
        batches.append(model.probabilities(model.logits(chunk.to(device))).cpu())
    return torch.cat(batches)


__all__ = ["load_model", "predict", "run", "run_argv"]
