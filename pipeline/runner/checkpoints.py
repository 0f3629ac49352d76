"""Reading this project's checkpoints: safely (``weights_only``), for the backbone the config names,
and into a model for evaluation or prediction. Used by the runner, ``stage=test``, soups and
``predict.py``, which therefore need nothing of the training runner."""

from __future__ import annotations

from pathlib import Path

import torch

from core.errors import ConfigError, load_problem
from lightning_modules.classifier import TransferClassifier


def load_checkpoint(path: str) -> dict:
    """A checkpoint loaded without running pickled code (``weights_only=True``), or a clear error."""
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap can only be used" not in str(err):
                raise
            # not a zip archive: an older format, a plain pickle or garbage; read without mmap, so
            # that the error (if any) says which
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure: refuse the file
        raise ConfigError(f"checkpoint {path} {load_problem(path, err)}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"{path} is not a checkpoint of this project (no state_dict)")
    return ckpt


def checkpoint_for(path: str, backbone: str) -> dict:
    """``load_checkpoint``, refusing a checkpoint of another backbone than ``model.backbone``."""
    ckpt = load_checkpoint(path)
    found = ckpt.get("hyper_parameters", {}).get("backbone")
    if found != backbone:
        raise ConfigError(f"checkpoint {path} was trained with backbone {found!r}, not model.backbone={backbone!r}")
    return ckpt


def model_from_checkpoint(path: str) -> TransferClassifier:
    """The trained model of a checkpoint of this project (for evaluation and prediction)."""
    load_checkpoint(path)  # refuses unsafe pickles with a clear error
    try:
        return TransferClassifier.load_from_checkpoint(path, map_location="cpu")
    except TypeError as err:  # hyperparameters this version does not have
        raise older_version(path, str(err)) from None
    except RuntimeError as err:
        raise state_dict_mismatch(path, err) from None


def older_version(path: str, detail: str) -> ConfigError:
    return ConfigError(
        f"checkpoint {path} was written by an older version of this project ({detail[:160]}): train again"
    )


def state_dict_mismatch(path: str, err: RuntimeError) -> Exception:
    """A one-line error for weights that do not fit this version's network; other errors unchanged."""
    if not str(err).startswith("Error(s) in loading state_dict"):
        return err
    lines = str(err).splitlines()
    detail = lines[1].strip() if len(lines) > 1 else ""
    if "head." in detail and "backbone." not in detail:  # the same network, another head
        return ConfigError(
            f"checkpoint {path} has another head than this config ({detail[:200]}): use its model.head_hidden "
            "and model.dropout (e.g. model.head_hidden=0 after stage=linear_probe)"
        )
    return older_version(path, detail)
