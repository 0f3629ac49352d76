"""Pretrained weights of a ``timm:<name>`` backbone: downloaded as timm does, or, offline, the one
file to fetch elsewhere and pass as ``model.weights=PATH`` (read off the model's pretrained config)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from core.errors import first_line
from lightning_modules.backbone_base import WeightsError

# timm's own files on the Hugging Face Hub (its timm/ repositories): safetensors, tried first by timm
HUB_FILE = "model.safetensors"


def weights_file(cfg: dict) -> str | None:
    """Where timm would fetch the weights of a pretrained config: the Hub file's address, or the URL."""
    if cfg.get("hf_hub_id"):
        repo, file = cfg["hf_hub_id"], cfg.get("hf_hub_filename") or HUB_FILE
        return f"https://huggingface.co/{repo}/resolve/main/{file}"
    return cfg.get("url") or None


def offline_hint(cfg: dict) -> str:
    """What to do without internet, in one line: the exact file to fetch and the key that takes it."""
    url = weights_file(cfg)
    fetch = (
        f"fetch {url} elsewhere and use model.weights=PATH/TO/{url.rsplit('/', 1)[-1]}"
        if url
        else "use model.weights=PATH/TO/weights.safetensors"
    )
    return (
        f"{fetch} (a timm state dict, .safetensors or .pth, loaded safely), or model.backbone=efficientnet_lite0 "
        "(its weights ship with pip), or model.pretrained=false"
    )


def _download_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, RuntimeError, ConnectionError]  # OSError: hub and URL errors
    try:
        from huggingface_hub.errors import EntryNotFoundError

        errors.append(EntryNotFoundError)
    except ImportError:
        pass
    return tuple(errors)


def _reason(err: BaseException) -> str:
    try:
        from huggingface_hub import constants
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return first_line(err, 200)
    if isinstance(err, LocalEntryNotFoundError):
        how = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub is unreachable"
        return f"{how} and the weights are not in its local cache"
    return first_line(err, 200)


def load_pretrained(create_pretrained: Callable[[], nn.Module], name: str, net: nn.Module) -> None:
    """timm's pretrained weights for ``net``, taken as ``timm.create_model(pretrained=True)`` takes
    them (``create_pretrained``: through the Hugging Face Hub or its cache)."""
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    if not any(cfg.get(k) for k in ("hf_hub_id", "url", "file", "state_dict")):
        model_name = name.split(":", 1)[-1]
        raise WeightsError(
            f"timm has no pretrained weights for {name}; pick a tag that has them "
            f"(timm.list_pretrained('{model_name.split('.')[0]}*')) or use model.pretrained=false"
        )
    try:
        source = create_pretrained()
    except _download_errors() as err:
        raise WeightsError(
            f"could not download the pretrained weights of {name} ({_reason(err)}); {offline_hint(cfg)}"
        ) from None
    net.load_state_dict(source.state_dict())
