"""The LightningModule: backbone + head, losses, torchmetrics and optimizer parameter groups."""

from __future__ import annotations

import math
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

from lightning_modules.backbones import build_backbone
from lightning_modules.calibration import ECE_BINS, to_probabilities
from lightning_modules.freeze_schedule import set_frozen_eval, set_trainable
from lightning_modules.heads import ClassifierHead
from lightning_modules.run_safety import NonFiniteLossError
from lightning_modules.schedule import Plan, param_groups, step_position
from lightning_modules.tensorboard_views import gather_cat

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


def make_optimizer(name: str, groups: list[dict[str, Any]], weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer over ``groups`` (each brings its rate and weight decay)."""
    if name == "rmsprop":
        # Keras' RMSprop defaults (rho 0.9, epsilon 1e-7), as in the seed.
        return torch.optim.RMSprop(groups, alpha=0.9, eps=1e-7, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


class TransferClassifier(LightningModule):
    """A registered backbone cut into blocks, plus the seed's dense head.

    Two forward paths, as timm's ``forward_features`` / ``forward_head``: images go through
    :meth:`forward_features` (the pooled backbone output, what the feature cache stores) and
    :meth:`forward_head`; with ``inputs="features"`` the steps take cached features and train the
    head path directly. The backbone is built with random weights; pretrained weights are loaded
    by the caller (``pipeline.stages``) or come with a checkpoint, so loading never downloads.
    ``plan`` (a :class:`~lightning_modules.schedule.Plan`) is what training executes; it is saved
    in every checkpoint. Defaults live in the config schema (``pipeline.config``), not here.
    """

    def __init__(
        self,
        *,
        backbone: str,
        class_names: list[str],
        image_size: int,
        pool: str,
        head_hidden: int,
        dropout: float,
        optim_name: str,
        weight_decay: float,
        decay_norm_and_bias: bool,
        train_bn: bool,
        tta_flip: bool,
        label_smoothing: float,
        # run settings, not part of the trained model (not saved as hyperparameters):
        inputs: str = "images",
        channels_last: bool = False,
        plan: Plan | None = None,
        # trained-model settings added later: defaults keep older checkpoints loadable
        class_weights: list[float] | None = None,
        l2sp: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["inputs", "channels_last", "plan"])
        self.class_names = list(class_names)
        # what the run's numbers mean (data, classes, preprocessing: pipeline/identity.py), set by the
        # runner and saved in every checkpoint so that resuming or reusing it can be checked
        self.identity: dict[str, Any] | None = None
        if len(self.class_names) < 2:
            raise ValueError(f"need at least two classes, got {self.class_names}")
        if inputs not in ("images", "features"):
            raise ValueError(f"inputs must be 'images' or 'features', got {inputs!r}")
        self.inputs = inputs
        self.channels_last = channels_last
        self.plan = plan
        self.backbone = build_backbone(backbone)
        self.binary = len(self.class_names) == 2
        outputs = 1 if self.binary else len(self.class_names)
        self.head = ClassifierHead(pool, self.backbone.output_shape(image_size), outputs, head_hidden, dropout)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.trainable_top = 0
        set_trainable(self.backbone.blocks, 0, train_bn)
        # ModuleDict keys may not shadow nn.Module attributes such as ``train``, hence the suffix.
        self.metrics = nn.ModuleDict({f"{s}_m": _metrics(len(self.class_names), s != "train") for s in SPLITS})
        self.losses = nn.ModuleDict({f"{s}_m": MeanMetric() for s in SPLITS})
        self.counts = nn.ModuleDict({f"{s}_m": SumMetric() for s in SPLITS})
        # Temperature scaling, fitted on the validation set after training (pipeline.stages):
        # evaluation logits are divided by it; saved with the weights, so every consumer of the
        # checkpoint (stage=test, predict.py, the export) gives the same probabilities.
        self.register_buffer("temperature", torch.ones(()))
        if class_weights is not None and len(class_weights) != len(self.class_names):
            raise ValueError(f"{len(class_weights)} class weights for {len(self.class_names)} classes")
        weights = torch.tensor(class_weights if class_weights is not None else [], dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)  # in hparams already
        # With collect_predictions, validation/test keep every image's logits in dataset order.
        self.collect_predictions = False
        self._outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.predictions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._steps_per_epoch: int | None = None

    def set_plan(self, plan: Plan) -> None:
        """The plan the next fit executes (the runner changes it only when a phase stops early)."""
        self.plan = plan

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
        unweighted, so they stay comparable between runs."""
        smoothing = self.hparams.label_smoothing if self.training else 0.0
        weighted = self.training and self.class_weights.numel() > 0
        if self.binary:
            soft = target.float() * (1 - smoothing) + 0.5 * smoothing
            if not weighted:
                return F.binary_cross_entropy_with_logits(logits.squeeze(1).float(), soft)
            per_image = F.binary_cross_entropy_with_logits(logits.squeeze(1).float(), soft, reduction="none")
            w = self.class_weights[target]
            return (per_image * w).sum() / w.sum()
        weight = self.class_weights if weighted else None
        return F.cross_entropy(logits.float(), target, weight=weight, label_smoothing=smoothing)

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
        if self.collect_predictions:
            self._outputs.append((logits.detach().float(), target.detach()))
        return {"loss": loss.detach(), "probs": probs, "target": target}

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

    # --- per-image predictions ----------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._outputs = []

    def on_test_epoch_start(self) -> None:
        self._outputs = []

    def on_validation_epoch_end(self) -> None:
        self._keep_predictions("val")

    def on_test_epoch_end(self) -> None:
        self._keep_predictions("test")

    def _keep_predictions(self, split: str) -> None:
        """Every image's logits (as evaluated: divided by the temperature) and target, gathered
        over ranks and put back in dataset order: the evaluation sampler gives rank ``r`` the indices
        ``r, r + W, r + 2W, ...`` (``datamodules.sampling.eval_sampler``)."""
        if not self.collect_predictions or self.trainer.sanity_checking:
            return
        width = 1 if self.binary else len(self.class_names)
        logits = torch.cat([o[0] for o in self._outputs]) if self._outputs else torch.zeros((0, width))
        targets = torch.cat([o[1] for o in self._outputs]) if self._outputs else torch.zeros((0,), dtype=torch.long)
        self._outputs = []
        logits = gather_cat(self.trainer, logits.to(self.device)).cpu()
        targets = gather_cat(self.trainer, targets.to(self.device)).cpu()
        world = self.trainer.world_size
        order = torch.tensor([i for r in range(world) for i in range(r, len(targets), world)], dtype=torch.long)
        in_order_logits, in_order_targets = torch.empty_like(logits), torch.empty_like(targets)
        in_order_logits[order], in_order_targets[order] = logits, targets
        self.predictions[split] = (in_order_logits, in_order_targets)

    # --- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        if self.plan is None:
            raise RuntimeError("this model has no plan to train with (see lightning_modules.schedule)")
        plan, hp = self.plan, self.hparams
        # with L2-SP the backbone is pulled towards its pretrained weights instead of towards zero
        groups = param_groups(
            self.head, self.backbone.blocks, plan, hp.weight_decay, hp.decay_norm_and_bias, backbone_decay=hp.l2sp <= 0
        )
        optimizer = make_optimizer(hp.optim_name, groups, hp.weight_decay)
        # The rate is the plan's at the global step: a LambdaLR over the step has no horizon of its
        # own, and is restored with the step on resume. Steps per epoch are known once the train
        # loader exists (sync_rates_with_plan); asking for them here would build the loader
        # before a resumed fit restores its epoch, and shuffle that epoch wrongly.
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: plan.factor(step_position(step, self._steps_per_epoch or 1))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch of the current fit (known from the start of its training)."""
        if self._steps_per_epoch is None:
            raise RuntimeError("steps per epoch are known once training starts (sync_rates_with_plan)")
        return self._steps_per_epoch

    def sync_rates_with_plan(self) -> None:
        """At the start of a fit's training (after any restore): count the optimizer steps per
        epoch as Lightning does, check the scheduler is at the global step, and set every group's
        rate from the plan (a resumed run with a changed plan gets the new plan's rates)."""
        trainer = self.trainer
        self._steps_per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if scheduler.last_epoch != trainer.global_step:
                raise RuntimeError(
                    f"the LR scheduler is at step {scheduler.last_epoch}, the trainer at {trainer.global_step}"
                )
            scheduler.base_lrs = [self.plan.peak_lr(g["name"]) for g in scheduler.optimizer.param_groups]
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.plan.lr(group["name"], trainer.global_step, self._steps_per_epoch)

    def on_fit_start(self) -> None:
        # a temperature is fitted for one set of weights: training starts uncalibrated (also
        # when it continues from a calibrated checkpoint, finetune.init_ckpt)
        self.temperature.fill_(1.0)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.identity = checkpoint.get("identity")
        # checkpoints written before temperature scaling existed: uncalibrated
        checkpoint["state_dict"].setdefault("temperature", torch.ones(()))
        if self.collect_predictions:
            # the final evaluation fits the temperature afresh on uncalibrated logits (a resumed
            # run's best checkpoint may hold the temperature an earlier evaluation stored)
            checkpoint["state_dict"]["temperature"] = torch.ones(())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["class_names"] = self.class_names
        checkpoint["backbone"] = self.hparams.backbone
        checkpoint["identity"] = self.identity
        if self.plan is not None:
            checkpoint["plan"] = self.plan.to_dict()
