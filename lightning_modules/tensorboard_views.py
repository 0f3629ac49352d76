"""TensorBoard views beyond scalars: the seed's two plots, input and error images, PR curve."""

from __future__ import annotations

from itertools import islice
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics.functional import confusion_matrix

from core.errors import UserError
from lightning_modules.cam import cam_available, gradcam, overlay
from lightning_modules.eval_outputs import gather_cat
from lightning_modules.figures import captioned_grid, confusion_matrix_image, denormalise

# The seed ends each method with these two plots: training vs validation accuracy and loss, against
# the epoch (epoch_log.EpochLog logs them so; train/acc and val/acc are against the step).
SEED_LAYOUT = {
    "seed plots (x: epoch)": {
        "accuracy: train vs validation": ["Multiline", ["epoch/train_acc", "epoch/val_acc"]],
        "loss: train vs validation": ["Multiline", ["epoch/train_loss", "epoch/val_loss"]],
    },
    "fine-tuning (x: step)": {
        "learning rates": ["Multiline", ["lr/.*"]],
        "trainable parameters": ["Multiline", ["trainable_params"]],
    },
}


def hparams_table(logger: TensorBoardLogger, params: dict[str, Any], metric_tags: list[str]) -> None:
    """The run's row of TensorBoard's HParams tab: ``params`` against the last value of each of
    ``metric_tags``, scalars the run logged already (``val/acc``: the best model's evaluation).
    Lightning's ``log_hyperparams(params, metrics)`` would log the metrics again as ``hparams/*``
    scalars, a one-point chart each in the Time Series tab."""
    from torch.utils.tensorboard.summary import hparams

    logger.log_hyperparams(params)  # hparams.yaml (no metrics: nothing logged as a scalar)
    writer = logger.experiment._get_file_writer()
    for summary in hparams(params, dict.fromkeys(metric_tags, 0.0)):  # the values are read from the scalars
        writer.add_summary(summary)


def tensorboard_writer(trainer: Trainer):
    """The TensorBoard SummaryWriter of the trainer's loggers (None without one)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class TensorBoardViews(Callback):
    """On fit start: the custom-scalar layout and a grid of augmented training images. At the end
    of every ``every_n_epochs``-th validation: the confusion matrix, the most confidently wrong
    validation images (with true class, prediction and probability; images from rank zero's
    shard under DDP), and for two classes a precision-recall curve."""

    def __init__(self, every_n_epochs: int = 1, max_images: int = 16):
        self.every_n_epochs = every_n_epochs
        self.max_images = max_images
        self._reset()

    def _reset(self) -> None:
        self.probs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        # (confidence, image or its index in the cached split, true class, predicted class, confidence)
        self.wrong: list[tuple[float, torch.Tensor | int, int, int, float]] = []
        self.seen = 0  # validation images so far this epoch

    def _due(self, trainer: Trainer) -> bool:
        return (
            self.every_n_epochs > 0
            and trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None or not trainer.is_global_zero:
            return
        writer.add_custom_scalars(SEED_LAYOUT)
        datasets = getattr(trainer.datamodule, "datasets", {})
        train = datasets.get("train")
        if train is None or pl_module.inputs == "features" or self.every_n_epochs == 0:  # image views off
            return
        # the first readable images (an image unreadable since the scan is None: listed by the dataset);
        # at most twice the grid's images are tried, so a folder that vanished is not read through
        tried = ((i, train[(trainer.current_epoch, i)]) for i in range(min(len(train), 2 * self.max_images)))
        picked = list(islice(((i, item[0]) for i, item in tried if item is not None), self.max_images))
        if not picked:
            return
        grid = captioned_grid(
            denormalise(torch.stack([image for _, image in picked]), pl_module.backbone.mean, pl_module.backbone.std),
            [pl_module.class_names[train.samples[i][1]] for i, _ in picked],
        )
        writer.add_image("train/augmented_inputs", grid, trainer.global_step)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx=0
    ) -> None:
        if not self._due(trainer) or outputs is None:
            return
        probs, target = outputs["probs"].float().cpu(), outputs["target"].cpu()
        self.probs.append(probs)
        self.targets.append(target)
        inputs = batch[0]
        first, self.seen = self.seen, self.seen + len(target)
        # cached features: the image is read back from its file at the epoch's end, by its place in the
        # split (sequential in one process; a DDP shard's place is not the file's, so none there)
        from_file = inputs.dim() != 4 and trainer.world_size == 1
        if inputs.dim() != 4 and not from_file:
            return
        confidence, predicted = probs.max(dim=1)
        for i in torch.nonzero(predicted != target).view(-1).tolist():
            # a copy: a view would keep its whole batch alive
            image = first + i if from_file else inputs[i].detach().cpu().clone()
            self.wrong.append((float(confidence[i]), image, int(target[i]), int(predicted[i]), float(confidence[i])))
        self.wrong = sorted(self.wrong, key=lambda w: -w[0])[: self.max_images]

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._due(trainer):
            return
        # Every rank joins the gathers, also one whose shard had no validation batch (returning
        # early there would leave the others waiting forever).
        device, n_classes = pl_module.device, len(pl_module.class_names)
        local_probs = torch.cat(self.probs) if self.probs else torch.zeros((0, n_classes))
        local_targets = torch.cat(self.targets) if self.targets else torch.zeros((0,), dtype=torch.long)
        probs = gather_cat(trainer, local_probs.to(device)).cpu()
        targets = gather_cat(trainer, local_targets.to(device)).cpu()
        writer = tensorboard_writer(trainer)
        if writer is None or not trainer.is_global_zero or len(targets) == 0:
            return
        names = pl_module.class_names
        step = trainer.global_step
        matrix = confusion_matrix(probs.argmax(1), targets, task="multiclass", num_classes=len(names))
        writer.add_image("val/confusion_matrix", confusion_matrix_image(matrix, names), step)
        if len(names) == 2:
            writer.add_pr_curve("val/pr_curve", targets, probs[:, 1], step)
        self.wrong = [(*w[:1], image, *w[2:]) for w in self.wrong if (image := _image(trainer, w[1])) is not None]
        if self.wrong:
            images = denormalise(
                torch.stack([w[1] for w in self.wrong]), pl_module.backbone.mean, pl_module.backbone.std
            )
            captions = [f"true {names[t]}\npred {names[p]} {c:.2f}" for _, _, t, p, c in self.wrong]
            writer.add_image("val/most_confident_errors", captioned_grid(images, captions), step)
            # where the model looked for its wrong answer (pip install -e ".[cam]"); image runs only
            if cam_available() and pl_module.inputs == "images":
                inputs = torch.stack([w[1] for w in self.wrong]).to(pl_module.device)
                try:
                    maps = gradcam(pl_module, inputs, [p for _, _, _, p, _ in self.wrong], pl_module.binary)
                except UserError as err:  # an extra view: the run goes on without it
                    rank_zero_warn(f"no val/most_confident_errors_gradcam: {err}")
                    return
                overlays = [torch.from_numpy(overlay(i.permute(1, 2, 0).numpy(), m)) for i, m in zip(images, maps)]
                grid = captioned_grid(torch.stack(overlays).permute(0, 3, 1, 2), captions)
                writer.add_image("val/most_confident_errors_gradcam", grid, step)


def _image(trainer: Trainer, image: torch.Tensor | int) -> torch.Tensor | None:
    """A validation image, or the one at that place of the cached split, read with the evaluation's
    transform (None if it became unreadable)."""
    if isinstance(image, torch.Tensor):
        return image
    item = trainer.datamodule.images.eval_dataset("val")[image]
    return None if item is None else item[0]
