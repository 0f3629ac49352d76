from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from datamodules.image_folder import DataLayoutError, ImageFolderDataModule, scan_splits
from datamodules.transforms import eval_transform, train_transform

from toy_data import make_image_tree


def test_split_discovery(toy_root):
    index = scan_splits(toy_root)
    assert index.classes == ["cats", "dogs"]
    assert index.counts() == {"train": 48, "val": 16, "test": 16}
    labels = {label for _, label in index.samples["train"]}
    assert labels == {0, 1}


def test_hidden_and_non_image_files_are_not_samples(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class={"train": 2, "validation": 2, "test": 2}, size=16)
    (root / "train" / "cats" / ".DS_Store").write_text("x")
    (root / "train" / "cats" / "notes.txt").write_text("x")
    assert scan_splits(root).counts()["train"] == 4


def test_class_mismatch_is_a_clear_error(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class={"train": 2, "validation": 2, "test": 2}, size=16)
    shutil.copytree(root / "test" / "dogs", root / "test" / "birds")
    with pytest.raises(DataLayoutError, match=r"classes differ between splits: train/ has \['cats', 'dogs'\]"):
        scan_splits(root)


def test_missing_split_is_a_clear_error(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class={"train": 2, "validation": 2, "test": 2}, size=16)
    shutil.rmtree(root / "validation")
    with pytest.raises(DataLayoutError, match="missing split folder .*validation"):
        scan_splits(root)


def test_empty_class_folder_is_a_clear_error(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class={"train": 2, "validation": 2, "test": 2}, size=16)
    for f in (root / "train" / "dogs").iterdir():
        f.unlink()
    with pytest.raises(DataLayoutError, match="has no image files"):
        scan_splits(root)


def _image() -> Image.Image:
    torch.manual_seed(0)
    return Image.fromarray((torch.rand(60, 80, 3) * 255).byte().numpy())


@pytest.mark.parametrize("preset", ["seed", "standard"])
def test_train_transform_augments_and_eval_is_deterministic(preset):
    image = _image()
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    train_tf = train_transform(preset, 32, mean, std)
    eval_tf = eval_transform(32, mean, std)
    torch.manual_seed(1)
    a, b = train_tf(image), train_tf(image)
    assert a.shape == b.shape == (3, 32, 32)
    assert not torch.equal(a, b)  # augmented: two draws differ
    assert torch.equal(eval_tf(image), eval_tf(image))
    assert train_transform("none", 32, mean, std)(image).equal(eval_tf(image))


def test_normalisation_comes_from_the_backbone():
    grey = Image.new("RGB", (20, 20), (128, 128, 128))
    x = eval_transform(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(grey)
    assert torch.allclose(x, torch.full_like(x, (128 / 255 - 0.5) / 0.5), atol=1e-6)


def test_validation_and_test_loaders_are_not_augmented(toy_root):
    dm = ImageFolderDataModule(toy_root, image_size=24, batch_size=4, num_workers=0, augment="standard")
    dm.setup("fit")
    first = next(iter(dm.val_dataloader()))[0]
    second = next(iter(dm.val_dataloader()))[0]
    assert torch.equal(first, second)
    assert first.shape == (4, 3, 24, 24)
    assert dm.classes == ["cats", "dogs"]
