from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_data import make_image_tree  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data" / "cats_and_dogs_small"


@pytest.fixture(autouse=True)
def _isolated_run_env(monkeypatch):
    # A run folder inherited through the environment is for DDP workers only.
    monkeypatch.delenv("TRANSFER_RUN_DIR", raising=False)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """Two learnable classes, 24/8/8 images per class, 40 px."""
    return make_image_tree(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """Random torchvision resnet18 weights as a local file: a stand-in for ImageNet weights offline."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def fast_args(root: Path, out_dir: Path, **extra: str) -> list[str]:
    """Overrides that shrink a run to seconds on a CPU."""
    args = {
        "data.root": str(root),
        "data.source": "none",  # never download in tests
        "speed.channels_last": "false",  # slower at 32 px on CPU (faster at real image sizes)
        "out_dir": str(out_dir),
        "model.backbone": "resnet18",
        "model.pretrained": "false",
        "data.image_size": "32",
        "data.batch_size": "8",
        "data.num_workers": "0",
        "optim.name": "adam",
        "optim.lr": "3e-3",
        "trainer.max_epochs": "3",
        "trainer.accelerator": "cpu",
        "trainer.devices": "1",
        "trainer.enable_progress_bar": "false",
        "trainer.enable_model_summary": "false",
        "trainer.log_every_n_steps": "1",
    }
    schedule_keys = {"finetune.warmup_epochs", "finetune.milestones"}
    if extra.get("stage", "finetune") == "finetune" and not schedule_keys & set(extra):
        args["finetune.warmup_epochs"] = "1"  # the preset's 30 warm-up epochs would never end in 3
    args |= extra
    return [f"{k}={v}" for k, v in args.items()]


def finetune_args(root: Path, out_dir: Path, **extra: str) -> list[str]:
    """``fast_args`` for a two-phase fine-tune: one head epoch, then the top block trains."""
    schedule = {"finetune.warmup_epochs": "1", "finetune.unfreeze_blocks": "1"}
    return fast_args(root, out_dir, stage="finetune", **(schedule | extra))
