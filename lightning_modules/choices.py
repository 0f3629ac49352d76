"""Names of the choices this package implements, in a module without heavy imports.

The config schema (``pipeline/config/schema.py``) and ``--help`` read them here without importing torch;
the implementing modules import them from here, so each list is written once.
"""

from __future__ import annotations

# The built-in keys of lightning_modules/backbones.py's BACKBONES (``timm:<name>`` besides).
BACKBONE_NAMES = (
    "vgg16",
    "resnet18",
    "resnet50",
    "efficientnet_b0",
    "mobilenet_v3_large",
    "convnext_tiny",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "tiny_cnn",
)
OPTIMIZERS = ("rmsprop", "adam", "adamw", "sgd")  # classifier.make_optimizer
SCHEDULERS = ("none", "cosine", "onecycle")  # schedule.build_plan
POOLS = ("avg", "flatten")  # heads.make_pool
# The validation metrics TransferClassifier logs, and whether higher is better (early stopping, best checkpoint).
MONITORS = {"val/acc": "max", "val/f1": "max", "val/auroc": "max", "val/loss": "min"}


def file_safe(name: str) -> str:
    """A backbone name usable in file names everywhere (``timm:resnet18`` -> ``timm-resnet18``): run
    folders and feature-cache files."""
    return name.replace(":", "-").replace("/", "-")
