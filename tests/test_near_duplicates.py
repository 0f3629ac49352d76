"""Near duplicates across splits: the hash, the bucketed search, the scan, the run folder, the download."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.data_index import scan_memory_path, scan_splits
from datamodules.download import prepare_dataset
from datamodules.fetch import file_sha256
from datamodules.image_io import check_image
from datamodules.near_duplicates import (
    MAX_DISTANCE,
    cross_split_pairs,
    dhash,
    evaluation_drops,
    near_duplicate_groups,
)

from conftest import fast_args
from helpers import run_dir, run_train
from toy_data import make_image_tree

HASH = "dHash 64-bit"


def picture(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A photo-like picture: smooth random structure at two scales (distinct seeds, distinct
    pictures; unlike flat colour fields, which would all hash alike)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    detail = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    return Image.blend(coarse, detail, 0.35)


def jpeg(image: Image.Image, quality: int = 90) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def distance(a: Image.Image, b: Image.Image) -> int:
    return bin(dhash(a) ^ dhash(b)).count("1")


def test_hash_survives_resizing_recompression_and_slight_crops_but_tells_pictures_apart():
    pictures = [picture(seed) for seed in range(40)]
    for original in pictures[:10]:
        w, h = original.size
        copies = {
            "half size, quality 60": jpeg(original.resize((w // 2, h // 2), Image.Resampling.BILINEAR), 60),
            "double size": jpeg(original.resize((2 * w, 2 * h), Image.Resampling.BICUBIC)),
            "quality 30": jpeg(original, 30),
            "1% cropped": original.crop((2, 1, w - 2, h - 1)),
            "grayscale": original.convert("L"),
        }
        for name, copy in copies.items():
            assert distance(original, copy) <= MAX_DISTANCE, name
    closest = min(distance(a, b) for i, a in enumerate(pictures) for b in pictures[i + 1 :])
    assert closest > 2 * MAX_DISTANCE  # 780 pairs of distinct pictures: none near the threshold


def _random_hashes(rng, splits: dict[str, int], flips: int, originals: int = 50) -> dict[str, list[tuple[str, int]]]:
    """Hashes scattered around a few originals (so near pairs exist), plus plain random ones."""
    base = [int(x) for x in rng.integers(0, 2**63, originals, dtype=np.uint64) * 2 + rng.integers(0, 2, originals)]
    out = {}
    for split, n in splits.items():
        items = []
        for k in range(n):
            if k % 3 == 0:
                h = int(rng.integers(0, 2**63)) << 1
            else:
                h = base[int(rng.integers(originals))]
                for bit in rng.choice(64, int(rng.integers(0, flips + 1)), replace=False):
                    h ^= 1 << int(bit)
            items.append((f"{split}/{k}", h))
        out[split] = items
    return out


def _brute_force(hashes_by_split, max_distance):
    order = ["train", "val", "test"]
    flat = [(split, path, h) for split in order for path, h in hashes_by_split[split]]
    rows = []
    for split_b, path_b, hb in flat:
        earlier = [(i, ha) for i, (split_a, _, ha) in enumerate(flat) if order.index(split_a) < order.index(split_b)]
        near = [(bin(ha ^ hb).count("1"), i) for i, ha in earlier if bin(ha ^ hb).count("1") <= max_distance]
        if near:
            d, i = min(near)  # closest, then first
            rows.append((flat[i][0], flat[i][1], split_b, path_b, d))
    return rows


@pytest.mark.parametrize("max_distance", [0, 3, MAX_DISTANCE, 7, 10])
def test_bucketed_search_finds_what_brute_force_finds(max_distance):
    rng = np.random.default_rng(max_distance)
    # flips up to 2 bits past the threshold: near misses too; the given split order does not matter
    hashes = _random_hashes(rng, {"test": 90, "train": 250, "val": 90}, flips=max_distance + 2)
    found = [tuple(row) for row in cross_split_pairs(hashes, max_distance)]
    expected = _brute_force(hashes, max_distance)
    assert found == expected and len(expected) > 20


def _brute_force_groups(hashes: dict[str, int], max_distance: int) -> list[list[str]]:
    group = {path: {path} for path in hashes}
    for a in hashes:
        for b in hashes:
            if a < b and bin(hashes[a] ^ hashes[b]).count("1") <= max_distance and group[a] is not group[b]:
                joined = group[a] | group[b]
                group |= dict.fromkeys(joined, joined)
    unique = {id(g): sorted(g) for g in group.values() if len(g) > 1}
    return sorted(unique.values(), key=lambda g: g[0])


@pytest.mark.parametrize("max_distance", [0, 3, MAX_DISTANCE, 8])
def test_groups_are_the_connected_components_of_near_pairs(max_distance):
    rng = np.random.default_rng(100 + max_distance)
    scattered = _random_hashes(rng, {"all": 300}, flips=max_distance + 2)["all"]
    hashes = dict(scattered) | {f"copy{i}": scattered[i][1] for i in range(0, 60, 3)}  # identical copies too
    found = near_duplicate_groups(hashes, max_distance)
    assert found == _brute_force_groups(hashes, max_distance) and len(found) > 10


def test_a_chain_of_near_duplicates_is_one_group():
    a, b, c = 0, 0b11111, 0b1111111111  # a~b (5 bits), b~c (5 bits), a and c 10 bits apart
    hashes = {"a": a, "b": b, "c": c, "far": 2**40 - 1, "e": 7, "f": 7}
    assert near_duplicate_groups(hashes) == [["a", "b", "c", "e", "f"]]  # e and f sit 3 bits from a
    assert near_duplicate_groups({"a": a, "c": c, "far": 2**40 - 1}) == []
    assert near_duplicate_groups({f"x{i}": 12345 for i in range(5000)}) == [sorted(f"x{i}" for i in range(5000))]
    with pytest.raises(ValueError, match="max_distance must be between 0 and 32"):
        near_duplicate_groups(hashes, 33)


def test_many_copies_give_one_row_per_evaluation_picture():
    """k copies of one picture in train and k in test: k rows, not k * k."""
    hashes = {"train": [(f"t{i}", 12345) for i in range(200)], "test": [(f"e{i}", 12345) for i in range(200)]}
    rows = cross_split_pairs(hashes)
    assert len(rows) == 200 and {r.file_a for r in rows} == {"t0"}  # the first of the closest


def test_drop_rule_removes_the_later_member_and_never_training():
    far = 2**40 - 1  # 40 bits from the others
    rows = cross_split_pairs({"train": [("a", 0)], "val": [("b", 0b1)], "test": [("c", 0b110), ("d", far)]})
    assert [(r.split_a, r.file_a, r.split_b, r.file_b, r.distance) for r in rows] == [
        ("train", "a", "val", "b", 1),
        ("train", "a", "test", "c", 2),  # the closest earlier picture: a (2 bits), not b (3)
    ]
    assert evaluation_drops(rows) == {"val": {"b"}, "test": {"c"}}
    val_test = cross_split_pairs({"train": [("a", far)], "val": [("b", 7)], "test": [("c", 7)]})
    assert evaluation_drops(val_test) == {"test": {"c"}}  # validation-test: test's member goes


def _plant(source: Path, target: Path) -> None:
    """A copy of ``source`` re-saved larger as a JPEG (so not byte-identical)."""
    with Image.open(source) as image:
        larger = image.convert("RGB").resize((2 * image.width, 2 * image.height), Image.Resampling.BICUBIC)
    larger.save(target, quality=80)


def test_scan_reports_a_planted_duplicate_and_drops_it_only_on_request(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class={"train": 6, "validation": 3, "test": 3})
    source = root / "train" / "dogs" / "dogs.2.png"
    planted = root / "test" / "dogs" / "planted.jpg"
    _plant(source, planted)

    index = scan_splits(root, threads=2, cache_dir=tmp_path / "cache")
    assert [(r.split_a, r.file_a, r.split_b, r.file_b) for r in index.near_duplicates] == [
        ("train", str(source), "test", str(planted))
    ]
    assert index.near_duplicates[0].distance <= MAX_DISTANCE
    assert index.counts() == {"train": 12, "val": 6, "test": 7} and index.dropped == {}
    assert index.near_duplicate_summary() == {"pairs": 1, "dropped": 0, "max_distance": MAX_DISTANCE, "hash": HASH}
    remembered = json.loads(scan_memory_path(tmp_path / "cache", root).read_text())["files"]
    assert int(remembered[str(planted)][3], 16) == check_image(str(planted)).dhash  # a re-scan decodes nothing

    dropped = scan_splits(root, threads=2, cache_dir=tmp_path / "cache", drop_near_duplicates=True)
    assert dropped.counts() == {"train": 12, "val": 6, "test": 6}  # training untouched
    assert dropped.dropped == {"test": [str(planted)]}
    assert str(planted) not in [p for p, _ in dropped.samples["test"]]


def test_distinct_pictures_are_not_reported(tmp_path):
    for split, seeds in (("train", range(0, 12)), ("validation", range(100, 106)), ("test", range(200, 206))):
        for label in ("cats", "dogs"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for seed in seeds:
                picture(seed + (1000 if label == "dogs" else 0)).save(folder / f"{seed}.jpg", quality=85)
    assert scan_splits(tmp_path, threads=2).near_duplicates == []


def test_a_run_lists_near_duplicates_and_counts_them_in_metrics(tmp_path):
    root = make_image_tree(tmp_path / "d", per_class={"train": 8, "validation": 4, "test": 4}, size=32)
    source = root / "train" / "cats" / "cats.5.png"
    planted = root / "validation" / "cats" / "planted.jpg"
    _plant(source, planted)
    args = fast_args(root, tmp_path / "out", stage="features", **{"trainer.max_epochs": "1"})
    metrics = run_train([*args, "data.drop_near_duplicates=true"])
    listing = (run_dir(metrics) / "near_duplicates.tsv").read_text().splitlines()
    assert listing[0] == "split_a\tfile_a\tsplit_b\tfile_b\tdistance"
    assert [line.split("\t")[:4] for line in listing[1:]] == [["train", str(source), "val", str(planted)]]
    assert metrics["near_duplicates"] == {"pairs": 1, "dropped": 1, "max_distance": MAX_DISTANCE, "hash": HASH}
    assert metrics["val"]["count"] == 8  # the planted copy was left out of validation


def _archive(path: Path, per_class: int = 12) -> None:
    """Microsoft's layout with structured pictures; each class's first three pictures also
    appear re-encoded at another size (different bytes, same picture)."""
    with zipfile.ZipFile(path, "w") as zf:
        for offset, folder in ((0, "Cat"), (500, "Dog")):
            for i in range(per_class):
                buffer = io.BytesIO()
                picture(offset + i).save(buffer, format="JPEG", quality=90)
                zf.writestr(f"PetImages/{folder}/{i}.jpg", buffer.getvalue())
            for i in range(3):
                buffer = io.BytesIO()
                picture(offset + i).resize((120, 90), Image.Resampling.BILINEAR).save(buffer, format="JPEG", quality=70)
                zf.writestr(f"PetImages/{folder}/copy{i}.jpg", buffer.getvalue())


def test_prepared_download_reports_near_duplicates_across_the_carved_splits(tmp_path):
    archive = tmp_path / "kagglecatsanddogs_5340.zip"
    _archive(archive)
    root, messages = tmp_path / "data", []
    prepare_dataset(root, "kaggle_cats_vs_dogs", archive.as_uri(), None, [7, 4, 4], 3, log=messages.append)
    assert any(m.startswith("near-duplicate check:") for m in messages)
    rows = [line.split("\t") for line in (root / "near_duplicates.tsv").read_text().splitlines()[1:]]
    # the expected pairs: an original and its copy that the split put into different folders
    where = {p.name: p.relative_to(root).as_posix() for p in root.glob("*/*/*.jpg")}
    extracted = root / "_download" / "extracted" / "PetImages"
    placed = {}
    for source in extracted.glob("*/*.jpg"):
        name = next((n for n in where if file_sha256(source)[:12] in n), None)
        placed[f"{source.parent.name}/{source.stem}"] = where.get(name) if name else None
    expected = set()
    for folder in ("Cat", "Dog"):
        for i in range(3):
            a, b = placed[f"{folder}/{i}"], placed[f"{folder}/copy{i}"]
            if a and b and a.split("/")[0] != b.split("/")[0]:
                expected.add(frozenset((a, b)))
    assert expected, "the seed should put at least one planted pair into two splits"
    assert {frozenset((r[1], r[3])) for r in rows} == expected
    assert f"{len(rows)} image pair(s)" in next(m for m in messages if m.startswith("near-duplicate check:"))
    shutil.rmtree(root / "_download")
