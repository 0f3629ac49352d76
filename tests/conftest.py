from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_data import make_image_tree  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data" / "cats_and_dogs_small"
# The suite's backbone: five small conv blocks, seconds per toy run on a CPU. Tests about a named
# backbone (torchvision, timm, their weights and feature-cache keys) use theirs.
BACKBONE = "tiny_cnn"


@pytest.fixture(autouse=True)
def _isolated_run_env(monkeypatch):
    # A run folder inherited through the environment is for DDP workers only.
    monkeypatch.delenv("TRANSFER_RUN_DIR", raising=False)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """Two learnable classes, 24/8/8 images per class, 40 px."""
    return make_image_tree(tmp_path_factory.mktemp("toy"))


_WEIGHTS: dict[str, Path] = {}


def stand_in_init(net: torch.nn.Module) -> torch.nn.Module:
    """``net``'s convolutions initialised as torchvision initialises its ResNets (Kaiming, fan-out):
    random, but with features of the scale a pretrained network's have (see ``backbone_weights``)."""
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return net


def backbone_weights() -> Path:
    """Stand-in pretrained weights of ``BACKBONE`` as a local file (made once per test session, like
    a download offline): random, with torchvision's initialisation of convolutions (Kaiming,
    fan-out), so a frozen backbone's features keep the scale a pretrained network's have and toy
    runs learn in a few epochs (the default initialisation shrinks them about 100-fold over five
    blocks: a frozen run would stay at chance)."""
    if BACKBONE not in _WEIGHTS:
        from lightning_modules.backbones import BACKBONES

        folder = Path(tempfile.mkdtemp(prefix="test-weights-"))
        atexit.register(shutil.rmtree, folder, True)
        with torch.random.fork_rng(devices=[]):  # the same weights every session; the caller's RNG untouched
            torch.manual_seed(7)
            torch.save(stand_in_init(BACKBONES[BACKBONE].build()).state_dict(), folder / f"{BACKBONE}.pth")
        _WEIGHTS[BACKBONE] = folder / f"{BACKBONE}.pth"
    return _WEIGHTS[BACKBONE]


@pytest.fixture(scope="session")
def weights_file() -> Path:
    """The stand-in for ImageNet weights offline that every ``fast_args`` run of ``BACKBONE`` loads."""
    return backbone_weights()


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> Callable[[Callable[[Path], list[str]]], dict]:
    """The uninterrupted reference of the resume tests, trained once per configuration and session:
    ``uninterrupted(args_for)`` is ``run_train(args_for(out))``'s metrics for a fresh ``out``; a
    second call with the same arguments (``out`` aside) returns the first run's."""
    from helpers import run_train

    runs: dict[tuple[str, ...], dict] = {}

    def reference(args_for: Callable[[Path], list[str]]) -> dict:
        key = tuple(args_for(Path("<out>")))
        if key not in runs:
            runs[key] = run_train(args_for(tmp_path_factory.mktemp("uninterrupted")))
        return runs[key]

    return reference


def fast_args(root: Path, out_dir: Path, **extra: str) -> list[str]:
    """Overrides that shrink a run to seconds on a CPU."""
    args = {
        "data.root": str(root),
        "data.source": "none",  # never download in tests
        "speed.channels_last": "false",  # slower at 32 px on CPU (faster at real image sizes)
        "out_dir": str(out_dir),
        "model.backbone": BACKBONE,
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
        # TensorBoard's confusion matrix, error grids (with Grad-CAM) and PR curve: on in the tests
        # that read them (log.images_every_n_epochs=1 there)
        "log.images_every_n_epochs": "0",
    }
    if extra.get("model.backbone", BACKBONE) == BACKBONE:
        args["model.weights"] = str(backbone_weights())
    schedule_keys = {"finetune.warmup_epochs", "finetune.milestones"}
    if extra.get("stage", "finetune") == "finetune" and not schedule_keys & set(extra):
        args["finetune.warmup_epochs"] = "1"  # the preset's 30 warm-up epochs would never end in 3
    args |= extra
    return [f"{k}={v}" for k, v in args.items()]


def finetune_args(root: Path, out_dir: Path, **extra: str) -> list[str]:
    """``fast_args`` for a two-phase fine-tune: one head epoch, then the top block trains."""
    schedule = {"finetune.warmup_epochs": "1", "finetune.unfreeze_blocks": "1"}
    return fast_args(root, out_dir, stage="finetune", **(schedule | extra))


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory) -> str:
    """The best checkpoint of a three-epoch frozen toy run (32 px): for predict.py and export tests."""
    from helpers import run_train

    root = make_image_tree(tmp_path_factory.mktemp("pred_data"), size=32)
    out = tmp_path_factory.mktemp("pred_run")
    return run_train(fast_args(root, out, stage="frozen", **{"trainer.max_epochs": "3"}))["best_ckpt"]


from postgres_server import postgres_url  # noqa: E402,F401 - a PostgreSQL server on loopback
from slurm_cluster import slurm_cluster  # noqa: E402,F401 - the one-node SLURM cluster fixture
