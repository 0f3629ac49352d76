"""data.augment=robust: the seed's geometry plus downscaling, colour jitter, blur and JPEG, seeded per sample."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from datamodules.data_index import scan_splits
from datamodules.decoded_cache import cached_size
from datamodules.image_folder import ImageFolderDataModule, LabeledImages
from datamodules.transforms import RandomDownscale, train_transform
from pipeline.config.load import load_config

from toy_data import make_image_tree

SIZE = 48
MEAN, STD = (0.5,) * 3, (0.25,) * 3


def _noise_image(height: int = 72, width: int = 96) -> Image.Image:
    """Per-pixel noise: all its energy is at high frequencies, which downscaling and JPEG remove."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _high_frequency(x: torch.Tensor) -> float:
    """Mean squared difference of neighbouring pixels."""
    return ((x[:, :, 1:] - x[:, :, :-1]).pow(2).mean() + (x[:, 1:] - x[:, :-1]).pow(2).mean()).item()


def _blockiness(x: torch.Tensor) -> float:
    """Steps across JPEG's 8x8 block edges relative to the steps inside the blocks (about 1 without JPEG)."""
    steps = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(0, 1))  # steps[j]: column j to j + 1
    at_edge = torch.arange(steps.numel()) % 8 == 7
    return (steps[at_edge].mean() / steps[~at_edge].mean()).item()


def _draws(transform, image, n: int = 30) -> list[torch.Tensor]:
    out = []
    for s in range(n):
        torch.manual_seed(s)
        out.append(transform(image))
    return out


@pytest.fixture
def one_file(tmp_path) -> Path:
    path = tmp_path / "noise.png"
    _noise_image().save(path)
    return path


def test_same_seed_and_index_give_the_same_tensor(one_file):
    # one file under every index: any difference comes from the per-sample seed alone
    tf = train_transform("robust", SIZE, MEAN, STD)
    ds = LabeledImages([(str(one_file), 0)] * 4, tf, SIZE, seed=7)
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(1)
    first, _ = ds[(2, 1)]
    torch.manual_seed(456)  # global torch, random and numpy states do not enter the sample's draws
    random.seed(2)
    np.random.seed(2)
    again, _ = ds[(2, 1)]
    assert first.shape == (3, SIZE, SIZE) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, ds[(2, 2)][0])  # another index
    assert not torch.equal(first, ds[(3, 1)][0])  # another epoch
    assert not torch.equal(first, LabeledImages(ds.samples, tf, SIZE, seed=8)[(2, 1)][0])  # another run seed


def test_robust_degrades_some_draws_and_seed_does_not():
    image = _noise_image()
    seed = _draws(train_transform("seed", SIZE, MEAN, STD), image)
    robust = _draws(train_transform("robust", SIZE, MEAN, STD), image)
    seed_hf = [_high_frequency(x) for x in seed]
    robust_hf = [_high_frequency(x) for x in robust]
    # downscaled (and low-quality JPEG) draws lose most of the noise's energy; the seed's warp keeps it
    assert min(seed_hf) > 0.8 * max(seed_hf)
    assert sum(h < 0.2 * min(seed_hf) for h in robust_hf) >= 3
    assert sum(h > 0.8 * min(seed_hf) for h in robust_hf) >= 3  # and some draws stay sharp
    # JPEG's 8x8 block edges show in some draws only, never in the seed's
    assert max(_blockiness(x) for x in seed) < 1.3
    assert sum(_blockiness(x) > 1.6 for x in robust) >= 3


def test_downscale_shrinks_to_between_a_quarter_and_the_full_size_and_never_upscales():
    down = RandomDownscale(SIZE // 4, SIZE + 1)
    image = torch.zeros(3, 60, 90, dtype=torch.uint8)
    shorter = []
    for s in range(40):
        torch.manual_seed(s)
        shorter.append(min(down(image).shape[-2:]))
    assert min(shorter) >= SIZE // 4 and max(shorter) <= SIZE and min(shorter) < SIZE // 2
    small = torch.zeros(3, 20, 30, dtype=torch.uint8)
    torch.manual_seed(0)
    shapes = [tuple(down(small).shape[-2:]) for _ in range(20)]
    assert all(h <= 20 and w <= 30 for h, w in shapes)  # a drawn side above 20 leaves it as it is
    assert (20, 30) in shapes and any(h < 20 for h, _ in shapes)


def test_robust_works_on_the_decoded_cache(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class={"train": 2, "validation": 1, "test": 1}, size=80)
    datasets = {}
    for preset in ("seed", "robust"):
        dm = ImageFolderDataModule(
            scan_splits(root),
            image_size=SIZE,
            batch_size=4,
            num_workers=0,
            augment=preset,
            mean=MEAN,
            std=STD,
            decoded_cache_dir=tmp_path / "cache",
        )
        dm.prepare_data()
        dm.setup("fit")
        datasets[preset] = dm.datasets["train"]
    ds = datasets["robust"]
    assert ds.decoded is not None and ds._image(0).shape == (3, cached_size(SIZE), cached_size(SIZE))
    x = ds[(1, 2)][0]
    assert x.shape == (3, SIZE, SIZE) and torch.equal(x, ds[(1, 2)][0])
    assert not torch.equal(x, ds[(1, 3)][0]) and not torch.equal(x, ds[(2, 2)][0])
    # the downscale still applies to the cached (1.15x) image: some draws are smooth without JPEG's
    # blocks, by more than the blur alone (sigma <= 1, about a tenth of the noise's energy left) can make them
    seed_hf = min(_high_frequency(datasets["seed"][(e, 0)][0]) for e in range(40))
    robust = [ds[(e, 0)][0] for e in range(40)]
    assert any(_high_frequency(x) < 0.06 * seed_hf and _blockiness(x) < 1.3 for x in robust)


def test_config_accepts_robust_and_lists_it(capsys):
    assert load_config(["stage=frozen", "data.augment=robust"]).data.augment == "robust"
    train.main(["--help"])
    augment_line = next(line for line in capsys.readouterr().out.splitlines() if "data.augment=" in line)
    assert "robust" in augment_line


def test_an_unknown_preset_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["data.augment=heavy"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.augment='heavy' is not valid" in err and "robust" in err
