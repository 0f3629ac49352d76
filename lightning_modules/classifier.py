"""The LightningModule: backbone + head, losses, torchmetrics and optimizer parameter groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryCalibrationError,
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassCalibrationError,
    MulticlassF1Score,
)

from core.errors import ConfigError
from lightning_modules.backbones import build_backbone
from lightning_modules.batch_mix import batch_mix, mix_batch
from lightning_modules.calibration import ECE_BINS, to_probabilities
from lightning_modules.freeze_schedule import set_frozen_eval, set_trainable
from lightning_modules.heads import ClassifierHead, HeadOptions
from lightning_modules.lora import add_adapters
from lightning_modules.run_safety import NonFiniteLossError
from lightning_modules.schedule import Plan, param_groups, top_blocks

SPLITS = ("train", "val", "test")


def _metrics(num_classes: int, calibration: bool) -> MetricCollection:
    """Accuracy, F1, AUROC and, for evaluation splits, the expected calibration error (on training
    batches, with augmentation and dropout, it would describe no model anyone uses, at a cost per
    step: it keeps every confidence of the epoch)."""
    if num_classes == 2:
        metrics = {"acc": BinaryAccuracy(), "f1": BinaryF1Score(), "auroc": BinaryAUROC()}
        ece = BinaryCalibrationError(n_bins=ECE_BINS)
    else:
        metrics = {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
            "auroc": MulticlassAUROC(num_classes),
        }
        ece = MulticlassCalibrationError(num_classes, n_bins=ECE_BINS)
    return MetricCollection(metrics | ({"ece": ece} if calibration else {}))


def flip_averaged(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, flip: bool) -> torch.Tensor:
    """Evaluation logits of images: with test-time flip, the mean of the image's and its mirror's
    (shared by the model's evaluation and the export, so both answer the same)."""
    return (forward(images) + forward(images.flip(-1))) / 2 if flip else forward(images)


OPTIMIZER_TYPES: dict[str, Callable[[list[dict[str, Any]], float], torch.optim.Optimizer]] = {
    # Keras' RMSprop defaults (rho 0.9, epsilon 1e-7), as in the seed
    "rmsprop": lambda groups, wd: torch.optim.RMSprop(groups, alpha=0.9, eps=1e-7, weight_decay=wd),
    "adam": lambda groups, wd: torch.optim.Adam(groups, weight_decay=wd),
    "adamw": lambda groups, wd: torch.optim.AdamW(groups, weight_decay=wd),
    "sgd": lambda groups, wd: torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9, nesterov=True, weight_decay=wd),
}


def make_optimizer(name: str, groups: list[dict[str, Any]], weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer ``optim.name`` over ``groups`` (each brings its rate and weight decay)."""
    return OPTIMIZER_TYPES[name](groups, weight_decay)


class TransferClassifier(LightningModule):
    """A registered backbone cut into blocks, plus the seed's dense head.

    Two forward paths, as timm's ``forward_features`` / ``forward_head``: images go through
    :meth:`forward_features` (the pooled backbone output, what the feature cache stores) and
    :meth:`forward_head`; with ``inputs="features"`` the steps take cached features and train the
    head path directly. The backbone is built with random weights; pretrained weights are loaded
    by the caller (``pipeline.runner.build``) or come with a checkpoint, so loading never downloads.
    ``plan`` (a :class:`~lightning_modules.schedule.Plan`) is what training executes; it is saved
    in every checkpoint, and its callback (``ApplyPlan``) sets the optimizer's rates. Defaults live
    in the config schema (``pipeline.config.load``), not here.
    """

    def __init__(
        self,
        *,
        backbone: str,
        class_names: list[str],
        image_size: int,
        head: HeadOptions,
        optim_name: str,
        weight_decay: float,
        decay_norm_and_bias: bool,
        train_bn: bool,
        tta_flip: bool,
        label_smoothing: float,
        class_weights: list[float] | None = None,
        l2sp: float = 0.0,
        mean: list[float] | None = None,  # the input normalisation, if not the backbone's own
        std: list[float] | None = None,
        crop_pct: float | None = None,
        lora: dict[str, Any] | None = None,  # finetune.method=lora: rank, alpha, dropout, targets (lora.py)
        # run settings, not part of the trained model (not saved as hyperparameters):
        inputs: str = "images",
        channels_last: bool = False,
        grad_checkpointing: bool = False,
        plan: Plan | None = None,
        mix: str = "none",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["inputs", "channels_last", "grad_checkpointing", "plan", "mix"])
        self.class_names = list(class_names)
        # what the run's numbers mean (data, classes, preprocessing: pipeline/config/identity.py), set by the
        # runner and saved in every checkpoint so that resuming or reusing it can be checked
        self.identity: dict[str, Any] | None = None
        if len(self.class_names) < 2:
            raise ValueError(f"need at least two classes, got {self.class_names}")
        if inputs not in ("images", "features"):
            raise ValueError(f"inputs must be 'images' or 'features', got {inputs!r}")
        self.inputs = inputs
        if mix != "none" and inputs == "features":
            raise ConfigError(f"data.mix={mix} mixes images: stage=features trains on cached features (data.mix=none)")
        self.mix = batch_mix(mix, len(self.class_names))
        self.channels_last = channels_last
        self.plan = plan
        self.backbone = build_backbone(backbone)
        # saved with the hyperparameters: predict.py, the export and stage=test normalise as training did
        self.backbone.mean = tuple(mean) if mean is not None else self.backbone.mean
        self.backbone.std = tuple(std) if std is not None else self.backbone.std
        self.backbone.crop_pct = crop_pct if crop_pct is not None else self.backbone.crop_pct
        self.backbone.grad_checkpointing = grad_checkpointing
        if lora is not None:  # before any weights are loaded: a checkpoint of a LoRA run holds its adapters
            add_adapters(self.backbone, lora)
        self.binary = len(self.class_names) == 2
        outputs = 1 if self.binary else len(self.class_names)
        shape = self.backbone.output_shape(image_size)
        self.head = ClassifierHead(head["pool"], shape, outputs, head["hidden"], head["dropout"])
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.trained_blocks: tuple[int, ...] = ()
        set_trainable(self.backbone.blocks, (), train_bn)
        # ModuleDict keys may not shadow nn.Module attributes such as ``train``, hence the suffix.
        self.metrics = nn.ModuleDict({f"{s}_m": _metrics(len(self.class_names), s != "train") for s in SPLITS})
        self.losses = nn.ModuleDict({f"{s}_m": MeanMetric() for s in SPLITS})
        self.counts = nn.ModuleDict({f"{s}_m": SumMetric() for s in SPLITS})
        # Temperature scaling, fitted on the validation set after training (pipeline.runner.evaluation):
        # evaluation logits are divided by it; saved with the weights, so every consumer of the
        # checkpoint (stage=test, predict.py, the export) gives the same probabilities.
        self.register_buffer("temperature", torch.ones(()))
        if class_weights is not None and len(class_weights) != len(self.class_names):
            raise ValueError(f"{len(class_weights)} class weights for {len(self.class_names)} classes")
        weights = torch.tensor(class_weights if class_weights is not None else [], dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)  # in hparams already

    def set_plan(self, plan: Plan) -> None:
        """The plan the next fit executes (the runner changes it only when a phase stops early)."""
        self.plan = plan

    # --- freezing -----------------------------------------------------------------------------
    def set_trainable_blocks(self, trained: tuple[int, ...]) -> None:
        """Only the blocks of index ``trained`` (and the head) train; the others are frozen, in eval mode."""
        set_trainable(self.backbone.blocks, trained, self.hparams.train_bn, adapter_only=self.hparams.lora is not None)
        self.trained_blocks = tuple(trained)
        self.train(self.training)

    def set_trainable_top(self, top: int) -> None:
        self.set_trainable_blocks(top_blocks(len(self.backbone.blocks), top))

    def train(self, mode: bool = True) -> TransferClassifier:
        super().train(mode)
        if mode:
            set_frozen_eval(self.backbone.blocks, self.trained_blocks, self.hparams.train_bn)
        return self

    # --- forward ------------------------------------------------------------------------------
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(B, D)``: the head's input, and what the feature cache stores."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head.pool(self.backbone(images))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head.classifier(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of this model's ``inputs``. Cached evaluation features may hold views
        ``(B, V, D)`` (the image and its mirror): their logits are averaged. With ``tta_flip``,
        evaluation of images averages the logits of each image and its mirror."""
        if self.training:
            return self(inputs) if self.inputs == "images" else self.forward_head(inputs)
        return self._eval_logits(inputs) / self.temperature

    def _eval_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.inputs == "features":
            if inputs.dim() == 3:
                batch, views = inputs.shape[:2]
                return self.forward_head(inputs.flatten(0, 1)).view(batch, views, -1).mean(dim=1)
            return self.forward_head(inputs)
        return flip_averaged(self, inputs, self.hparams.tta_flip)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities, shape ``(B, num_classes)``."""
        return to_probabilities(logits, self.binary)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy; in training with label smoothing and the class weights (a weighted mean:
        sum of w[y] * loss / sum of w[y], as torch's weighted cross-entropy). Evaluation losses are
        unweighted, so they stay comparable between runs. ``target``: class indices, or soft labels
        ``(B, C)`` of a mixed batch (``data.mix``; a soft label's weight is its mix of w)."""
        smoothing = self.hparams.label_smoothing if self.training else 0.0
        weighted = self.training and self.class_weights.numel() > 0
        soft_labels = target.dim() == 2
        if self.binary:
            positive = target[:, 1] if soft_labels else target.float()
            soft = positive * (1 - smoothing) + 0.5 * smoothing
            if not weighted:
                return F.binary_cross_entropy_with_logits(logits.squeeze(1).float(), soft)
            per_image = F.binary_cross_entropy_with_logits(logits.squeeze(1).float(), soft, reduction="none")
            w = target @ self.class_weights if soft_labels else self.class_weights[target]
            return (per_image * w).sum() / w.sum()
        if soft_labels and weighted:  # torch divides soft-label losses by the batch, not the weights
            per_image = F.cross_entropy(
                logits.float(), target, weight=self.class_weights, label_smoothing=smoothing, reduction="none"
            )
            w = target @ self.class_weights
            return per_image.sum() / w.sum()
        weight = self.class_weights if weighted else None
        return F.cross_entropy(logits.float(), target, weight=weight, label_smoothing=smoothing)

    # --- steps --------------------------------------------------------------------------------
    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        inputs, target = batch
        # a mixed batch: the loss takes the mixed labels, the metrics each image's own (hard) label
        inputs, loss_target = mix_batch(self.mix, inputs, target) if self.mix and split == "train" else (inputs, target)
        logits = self.logits(inputs)
        loss = self._loss(logits, loss_target)
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
        # read by the evaluation's callbacks (TensorBoardViews, eval_outputs.CollectOutputs)
        return {"loss": loss.detach(), "logits": logits.detach().float(), "probs": probs, "target": target}

    # --- L2-SP (Li et al., ICML 2018): pull the trained backbone towards its starting weights ---
    def set_l2sp_reference(self) -> None:
        """Remember the backbone's current (pretrained) weights as the L2-SP anchor: non-persistent
        buffers, so they follow the model's device and stay out of checkpoints (a resumed run builds
        the same anchor again from the same pretrained weights)."""
        self.l2sp_reference = nn.Module()
        for name, param in self.backbone.named_parameters():
            self.l2sp_reference.register_buffer(name.replace(".", "__"), param.detach().clone(), persistent=False)

    def l2sp_penalty(self) -> torch.Tensor:
        """``l2sp / 2 * ||w - w_0||^2`` over the backbone parameters being trained."""
        reference = self.l2sp_reference
        terms = [
            (param - getattr(reference, name.replace(".", "__"))).pow(2).sum()
            for name, param in self.backbone.named_parameters()
            if param.requires_grad
        ]
        total = torch.stack(terms).sum() if terms else torch.zeros((), device=self.device)
        return 0.5 * self.hparams.l2sp * total

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        if self.hparams.l2sp > 0:
            penalty = self.l2sp_penalty()
            self.log("train/l2sp", penalty.detach(), on_step=True, on_epoch=False, batch_size=batch[1].numel())
            loss = loss + penalty
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
    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.plan is None:
            raise RuntimeError("this model has no plan to train with (see lightning_modules.schedule)")
        plan, hp = self.plan, self.hparams
        # with L2-SP the backbone is pulled towards its pretrained weights instead of towards zero
        groups = param_groups(
            self.head, self.backbone.blocks, plan, hp.weight_decay, hp.decay_norm_and_bias, backbone_decay=hp.l2sp <= 0
        )
        # no scheduler: ApplyPlan sets every group's rate from the plan at each step
        return make_optimizer(hp.optim_name, groups, hp.weight_decay)

    def on_fit_start(self) -> None:
        # a temperature is fitted for one set of weights: training starts uncalibrated (also
        # when it continues from a calibrated checkpoint, finetune.init_ckpt)
        self.temperature.fill_(1.0)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "temperature" not in checkpoint["state_dict"]:  # written before temperature scaling existed
            raise ConfigError(
                "the checkpoint was written by an older version of this project (no temperature): train again"
            )
        self.identity = checkpoint.get("identity")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["class_names"] = self.class_names
        checkpoint["backbone"] = self.hparams.backbone
        checkpoint["identity"] = self.identity
        if self.plan is not None:
            checkpoint["plan"] = self.plan.to_dict()
