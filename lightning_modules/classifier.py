"""The LightningModule: backbone + head, losses, torchmetrics and optimizer parameter groups."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
)

from lightning_modules.backbones import build_backbone
from lightning_modules.freeze_schedule import set_frozen_eval, set_trainable
from lightning_modules.heads import ClassifierHead
from lightning_modules.run_safety import NonFiniteLossError

SPLITS = ("train", "val", "test")


def _metrics(num_classes: int) -> MetricCollection:
    if num_classes == 2:
        return MetricCollection({"acc": BinaryAccuracy(), "f1": BinaryF1Score(), "auroc": BinaryAUROC()})
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
            "auroc": MulticlassAUROC(num_classes),
        }
    )


def make_optimizer(name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "rmsprop":
        # Keras' RMSprop defaults (rho 0.9, epsilon 1e-7), as in the seed.
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.9, eps=1e-7, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


class TransferClassifier(LightningModule):
    """A registered backbone cut into blocks, plus the seed's dense head.

    The backbone is built with random weights; pretrained weights are loaded by the caller
    (``pipeline.stages``) or come with a checkpoint, so loading a checkpoint never downloads.
    With ``on_features = True`` the steps take cached ``head.pool`` outputs instead of images.
    """

    def __init__(
        self,
        backbone: str,
        class_names: list[str],
        image_size: int,
        pool: str = "avg",
        head_hidden: int = 256,
        dropout: float = 0.5,
        optim_name: str = "rmsprop",
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        scheduler: str = "none",
        backbone_lr_ratio: float = 1.0,
        train_bn: bool = False,
        tta_flip: bool = False,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.class_names = list(class_names)
        if len(self.class_names) < 2:
            raise ValueError(f"need at least two classes, got {self.class_names}")
        self.backbone = build_backbone(backbone)
        self.binary = len(self.class_names) == 2
        outputs = 1 if self.binary else len(self.class_names)
        self.head = ClassifierHead(pool, self.backbone.output_shape(image_size), outputs, head_hidden, dropout)
        self.on_features = False
        self.channels_last = False  # set by the pipeline with speed.channels_last
        self.trainable_top = 0
        set_trainable(self.backbone.blocks, 0, train_bn)
        # ModuleDict keys may not shadow nn.Module attributes such as ``train``, hence the suffix.
        self.metrics = nn.ModuleDict({f"{s}_m": _metrics(len(self.class_names)) for s in SPLITS})
        self.losses = nn.ModuleDict({f"{s}_m": MeanMetric() for s in SPLITS})
        self.counts = nn.ModuleDict({f"{s}_m": SumMetric() for s in SPLITS})

    # --- freezing -----------------------------------------------------------------------------
    def set_trainable_top(self, top: int) -> None:
        set_trainable(self.backbone.blocks, top, self.hparams.train_bn)
        self.trainable_top = top
        self.train(self.training)

    def train(self, mode: bool = True) -> TransferClassifier:
        super().train(mode)
        if mode:
            set_frozen_eval(self.backbone.blocks, self.trainable_top, self.hparams.train_bn)
        return self

    # --- forward ------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(images))

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """What the feature cache stores: the head's pooled input."""
        return self.head.pool(self.backbone(images))

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits for images, or for cached features. Cached evaluation features may hold views
        ``(B, V, D)`` (the image and its mirror): their logits are averaged. With ``tta_flip``,
        evaluation of images averages the logits of each image and its mirror."""
        if self.on_features:
            if inputs.dim() == 3:
                batch, views = inputs.shape[:2]
                return self.head.classifier(inputs.flatten(0, 1)).view(batch, views, -1).mean(dim=1)
            return self.head.classifier(inputs)
        if self.hparams.tta_flip and not self.training:
            return (self(inputs) + self(inputs.flip(-1))) / 2
        return self(inputs)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities, shape ``(B, num_classes)``."""
        if self.binary:
            p = torch.sigmoid(logits.float().squeeze(1))
            return torch.stack([1 - p, p], dim=1)
        return logits.float().softmax(dim=1)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        smoothing = self.hparams.label_smoothing if self.training else 0.0
        if self.binary:
            soft = target.float() * (1 - smoothing) + 0.5 * smoothing
            return F.binary_cross_entropy_with_logits(logits.squeeze(1).float(), soft)
        return F.cross_entropy(logits.float(), target, label_smoothing=smoothing)

    # --- steps --------------------------------------------------------------------------------
    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        inputs, target = batch
        logits = self.logits(inputs)
        loss = self._loss(logits, target)
        probs = self.probabilities(logits).detach()
        preds_for_metrics = probs[:, 1] if self.binary else probs
        metrics, losses, counts = (d[f"{split}_m"] for d in (self.metrics, self.losses, self.counts))
        metrics.update(preds_for_metrics, target)
        losses.update(loss.detach(), weight=target.numel())
        counts.update(torch.tensor(float(target.numel()), device=target.device))
        batch_size = target.numel()
        if split == "train":
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        self.log_dict(
            {f"{split}/{k}": m for k, m in metrics.items()},
            on_step=False,
            on_epoch=True,
            batch_size=batch_size,
            prog_bar=split == "val",
        )
        self.log(
            f"{split}/loss_epoch" if split == "train" else f"{split}/loss",
            losses,
            on_step=False,
            on_epoch=True,
            batch_size=batch_size,
            prog_bar=split == "val",
        )
        self.log(f"{split}/count", counts, on_step=False, on_epoch=True, batch_size=batch_size)
        if split == "train":
            return loss
        return {"loss": loss.detach(), "probs": probs, "target": target}

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        bad = not bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:  # all ranks stop together, or the others would hang
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}); stopped without saving, the last good checkpoint is kept "
                "(try a lower optim.lr)"
            )
        return loss

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._step(batch, "test")

    # --- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        # Every parameter is in the optimizer from the start (frozen ones just get no gradient),
        # so unfreezing never adds groups: resume, DDP and schedulers all see one structure.
        groups = [
            {"name": "head", "params": list(self.head.parameters()), "lr": hp.lr},
            {"name": "backbone", "params": list(self.backbone.parameters()), "lr": hp.lr * hp.backbone_lr_ratio},
        ]
        optimizer = make_optimizer(hp.optim_name, groups, hp.lr, hp.weight_decay)
        if hp.scheduler == "cosine":
            epochs = max(1, int(self._trainer.max_epochs or 1)) if self._trainer is not None else 1
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        return optimizer

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["class_names"] = self.class_names
        checkpoint["backbone"] = self.hparams.backbone
