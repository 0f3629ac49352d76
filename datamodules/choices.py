"""Names of the choices this package implements, in a module without heavy imports.

The config schema (``pipeline/config/schema.py``) and ``--help`` read them here without importing
torchvision; the implementing modules import them from here, so each list is written once.
"""

from __future__ import annotations

# datamodules/transforms.py (the last three: torchvision's policies, transforms.POLICIES)
AUGMENT_PRESETS = ("none", "seed", "standard", "robust", "randaugment", "trivialaugment", "autoaugment")
MIX_MODES = ("none", "mixup", "cutmix")  # lightning_modules/batch_mix.py
# The keys of datamodules/shifts.py's SHIFTS, in the report's order.
SHIFT_NAMES = ("lowres", "jpeg", "blur", "noise", "brightness", "contrast", "grayscale", "rotation")
# The keys of datamodules/download.py's SOURCES, and "none" (never download).
SOURCE_NAMES = ("kaggle_cats_vs_dogs", "oxford_pets", "oxford_pets_breeds", "none")
