"""Figures for a notebook (matplotlib; ``pip install -e ".[notebook]"``): what the training sees, where a
trained model goes wrong.

    fig = show_batch(data_root="photos/", data_augment="randaugment")   # augmented training images
    fig = top_losses(model, "photos/validation", k=9)                   # the most confident mistakes
    fig = confusion_matrix(model, "photos/validation")

``show_batch`` takes ``run``'s keyword overrides; the other two a model (``load_model``) and a folder of
class folders (a split of the data), whose class folders must be the model's classes.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core.errors import ConfigError
from datamodules.flat_folder import list_flat
from datamodules.image_folder import ImageFolderDataModule
from datamodules.image_io import load_rgb
from lightning_modules.backbones import build_backbone
from lightning_modules.batch_mix import batch_mix, mix_batch
from lightning_modules.classifier import TransferClassifier
from lightning_modules.figures import denormalise
from pipeline.config.load import load_config
from pipeline.inference import CLEAN, predict_variants

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(figsize: tuple[float, float]) -> Figure:
    """A matplotlib Figure that Jupyter shows as it is returned (its ``_repr_png_``), without pyplot:
    no global figure list to grow, no second copy drawn by the inline backend."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError('the notebook figures need matplotlib: pip install -e ".[notebook]"') from None

    class Picture(Figure):
        def _repr_png_(self) -> bytes:
            out = io.BytesIO()
            self.savefig(out, format="png")
            return out.getvalue()

    return Picture(figsize=figsize, layout="constrained")


def image_grid(images: list[Any], titles: list[str], columns: int = 4) -> Figure:
    """``images`` (PIL images or uint8 ``(3, H, W)`` tensors) in a grid, each with its title."""
    columns = min(columns, max(1, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    fig = _figure((columns * 2.2, rows * 2.55))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, title in zip(axes, images, titles):
        ax.imshow(image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else image)
        ax.set_title(title, fontsize=9)
    return fig


def show_batch(n: int = 16, epoch: int = 0, **overrides: Any) -> Figure:
    """``n`` training images (drawn by ``seed``) of ``epoch`` as the model sees them (``data.augment``,
    ``data.random_erasing`` and, when set, ``data.mix``, seeded as a run seeds them), titled with
    their labels (a mixed image: both classes and their shares). Keywords: ``run``'s overrides."""
    from pipeline.api import to_argv
    from pipeline.runner.build import scan_data

    cfg = load_config(["stage=frozen", *to_argv(overrides)])
    index, _ = scan_data(cfg)
    backbone = build_backbone(cfg.model.backbone)
    data = ImageFolderDataModule(
        index,
        image_size=cfg.data.image_size,
        num_workers=0,
        augment=cfg.data.augment,
        mean=backbone.mean,
        std=backbone.std,
        seed=cfg.seed,
        interpolation=backbone.interpolation,
        random_erasing=cfg.data.random_erasing,
    )
    data.setup("fit")
    train = data.datasets["train"]
    picked = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[:n].tolist()
    items = [item for i in picked if (item := train[(epoch, i)]) is not None]  # None: unreadable
    images = torch.stack([image for image, _ in items])
    labels = torch.tensor([label for _, label in items])
    names = index.classes
    mix = batch_mix(cfg.data.mix, len(names))
    if mix is None:
        return image_grid(list(denormalise(images, backbone.mean, backbone.std)), [names[i] for i in labels])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        images, soft = mix_batch(mix, images, labels)
    titles = [
        " + ".join(f"{names[c]} {p:.2f}" for c, p in sorted(enumerate(row.tolist()), key=lambda x: -x[1]) if p > 0)
        for row in soft
    ]
    return image_grid(list(denormalise(images, backbone.mean, backbone.std)), titles)


@dataclass
class SplitPredictions:
    files: list[str]
    targets: torch.Tensor  # class index per readable file
    probs: torch.Tensor  # (N, classes), as predict() computes them (temperature, test-time flip)


def split_predictions(
    model: TransferClassifier, folder: str | os.PathLike, batch_size: int = 32, device: str = "cpu"
) -> SplitPredictions:
    """The model's probabilities for every readable image of ``folder/<class>/``."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{folder}: no such folder (expected <folder>/<class>/<images>)")
    classes, files, _ = list_flat(root)
    if classes != list(model.class_names):
        raise ConfigError(f"{folder} has class folders {classes}, the model's classes are {list(model.class_names)}")
    samples = [(str(root / f), label) for label, c in enumerate(classes) for f in files[c]]
    pred = predict_variants(model, samples, [(CLEAN, 0)], 0, device, batch_size, 0)
    keep = pred.readable
    readable = [file for (file, _), ok in zip(samples, keep.tolist()) if ok]
    return SplitPredictions(readable, pred.targets[keep], model.probabilities(pred.logits[0][keep]))


def top_losses(model: TransferClassifier, folder: str | os.PathLike, k: int = 9, batch_size: int = 32) -> Figure:
    """The ``k`` most confident mistakes on ``folder/<class>/`` (highest probability of a wrong class
    first): each image with its true and predicted class and the two probabilities."""
    pred = split_predictions(model, folder, batch_size)
    confidence, predicted = pred.probs.max(dim=1)
    wrong = torch.nonzero(predicted != pred.targets).view(-1)
    order = wrong[torch.argsort(confidence[wrong], descending=True)][:k].tolist()
    names = model.class_names
    titles = [
        f"true {names[pred.targets[i]]} ({pred.probs[i, pred.targets[i]]:.2f})\n"
        f"pred {names[predicted[i]]} ({confidence[i]:.2f})"
        for i in order
    ]
    size = int(model.hparams.image_size)
    if not order:  # a figure that says so, not an empty canvas under a title
        fig = _figure((4.5, 1.2))
        fig.text(0.5, 0.5, f"no mistakes on the {len(pred.files)} images of {short_name(folder)}", ha="center")
        return fig
    fig = image_grid([load_rgb(pred.files[i], size) for i in order], titles, columns=3)
    where = f"{len(pred.files)} images of {short_name(folder)}"
    fig.suptitle(f"{len(order)} most confident of {len(wrong)} mistakes on {where}")
    return fig


def short_name(folder: str | os.PathLike) -> str:
    """A folder as a figure's title names it: its last two parts (``photos/validation``), not a long path."""
    return "/".join(Path(folder).resolve().parts[-2:])


def confusion_matrix(model: TransferClassifier, folder: str | os.PathLike, batch_size: int = 32) -> Figure:
    """The confusion matrix on ``folder/<class>/`` (rows: true class, columns: predicted), drawn by
    torchmetrics' ``plot``."""
    from torchmetrics.classification import MulticlassConfusionMatrix

    side = 2.5 + 0.6 * len(model.class_names)
    fig = _figure((side, side))
    pred = split_predictions(model, folder, batch_size)
    metric = MulticlassConfusionMatrix(num_classes=len(model.class_names))
    metric.update(pred.probs.argmax(dim=1), pred.targets)
    _, ax = metric.plot(ax=fig.subplots(), labels=list(model.class_names))
    ax.set_title(f"{short_name(folder)}: {len(pred.files)} images")
    return fig


__all__ = ["confusion_matrix", "show_batch", "split_predictions", "top_losses"]
