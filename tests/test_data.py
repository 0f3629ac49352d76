from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from datamodules.data_index import scan_splits
from datamodules.image_folder import ImageFolderDataModule
from datamodules.layout import DataLayoutError
from datamodules.transforms import EdgeFillAffine, eval_transform, train_transform

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


@pytest.mark.parametrize(
    "angle, translate, scale, shear", [(17.0, (5, -3), 1.08, (0.1, 0.0)), (-20.0, (-4, 4), 0.9, (0.0, 0.0))]
)
def test_seed_affine_is_torchvisions_with_the_edge_as_fill(angle, translate, scale, shear):
    """Inside the image, exactly torchvision's RandomAffine; outside it, the nearest edge pixel
    (Keras' fill_mode='nearest') where torchvision can only fill a constant."""
    torch.manual_seed(0)
    image = torch.randint(0, 255, (3, 40, 48), dtype=torch.uint8)
    params = {"angle": angle, "translate": translate, "scale": scale, "shear": shear}
    ours = EdgeFillAffine(degrees=0).transform(image, params)
    # torchvision's, with a marker (one coordinate plane each) to see where it samples from
    rows = torch.arange(40, dtype=torch.float32).view(1, 40, 1).expand(1, 40, 48)
    cols = torch.arange(48, dtype=torch.float32).view(1, 1, 48).expand(1, 40, 48)
    marked = torch.cat([image.float(), rows, cols])
    theirs = v2.functional.affine(marked, **params, interpolation=v2.InterpolationMode.NEAREST, fill=-1.0)
    inside = theirs[3] >= 0
    assert 0.3 < inside.float().mean() < 1.0  # the case has both: sampled pixels and fill
    assert torch.equal(ours[:, inside], theirs[:3, inside].to(torch.uint8))
    # outside: a pixel of the image's border, the one nearest to where the warp points
    edge = torch.zeros(40, 48, dtype=torch.bool)
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    border_values = {tuple(v) for v in image[:, edge].T.tolist()}
    assert all(tuple(v) in border_values for v in ours[:, ~inside].T.tolist())


def test_seed_augmentation_keeps_uint8_images_and_their_values():
    torch.manual_seed(2)
    image = torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)
    out = EdgeFillAffine(degrees=20, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=0.1)(image)
    assert out.dtype == torch.uint8 and out.shape == image.shape
    assert set(out.unique().tolist()) <= set(image.unique().tolist())  # nearest: no new values, no fill


def test_normalisation_comes_from_the_backbone():
    grey = Image.new("RGB", (20, 20), (128, 128, 128))
    x = eval_transform(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(grey)
    assert torch.allclose(x, torch.full_like(x, (128 / 255 - 0.5) / 0.5), atol=1e-6)


def test_validation_and_test_loaders_are_not_augmented(toy_root):
    dm = ImageFolderDataModule(scan_splits(toy_root), image_size=24, batch_size=4, num_workers=0, augment="standard")
    dm.setup("fit")
    first = next(iter(dm.val_dataloader()))[0]
    second = next(iter(dm.val_dataloader()))[0]
    assert torch.equal(first, second)
    assert first.shape == (4, 3, 24, 24)
    assert dm.classes == ["cats", "dogs"]
