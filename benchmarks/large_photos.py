#!/usr/bin/env python
"""Training-loader throughput on 12-megapixel photos (phone-camera size).

    python benchmarks/large_photos.py [--data ../shared/data/cats_and_dogs_small] [--images 64]

Generates ``--images`` 4000 x 3000 JPEGs by upscaling the shared photos and re-encoding them
(quality 90), then measures the training loader (augmentation ``seed``, 224 px, batch 32, one worker
per core; median of 3 passes over the images) three ways: full-size decoding (what a plain
``PIL.Image.open`` loader does), reduced-scale JPEG decoding (PIL's ``draft``, the project's default:
a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that still leaves 2 x the input size), and
``data.decoded_cache=true`` (decoded and resized once, then memory-mapped), with its build time.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_large_photos(source: Path, target: Path, n: int, size: tuple[int, int] = (4000, 3000)) -> None:
    from PIL import Image

    from datamodules.image_io import load_rgb

    for split, count in (("train", n), ("validation", 2), ("test", 2)):
        for name in ("cats", "dogs"):
            files = sorted((source / "train" / name).glob("*.jpg"))[: count // 2]
            folder = target / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for f in files:  # load_rgb: upright (EXIF orientation applied), as training reads it
                load_rgb(f).resize(size, Image.BICUBIC).save(folder / f.name, quality=90)


def loader_rate(dm, passes: int = 3) -> float:
    rates = []
    for _ in range(passes):
        loader = dm.loader(dm.datasets["train"], train=True)
        started, seen = time.perf_counter(), 0
        for _, target in loader:
            seen += target.shape[0]
        rates.append(seen / (time.perf_counter() - started))
    return sorted(rates)[len(rates) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cats_and_dogs_small"))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    from datamodules.data_index import scan_splits
    from datamodules.image_folder import ImageFolderDataModule, default_num_workers

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="large_photos-"))
    data = work / "data"
    if not data.is_dir():
        started = time.perf_counter()
        make_large_photos(Path(args.data), data, args.images)
        print(f"generated {args.images} 12-MP JPEGs in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    index = scan_splits(data, cache_dir=work / "cache")  # the decode check, remembered for the next run

    def datamodule(decoded: bool) -> ImageFolderDataModule:
        dm = ImageFolderDataModule(
            index,
            224,
            32,
            default_num_workers(),
            "seed",
            decoded_cache_dir=work / "cache" if decoded else None,
        )
        dm.prepare_data()
        dm.setup("fit")
        return dm

    plain = datamodule(decoded=False)
    rows = []
    plain.datasets["train"].min_size = None  # decode every JPEG at full size
    rows.append(("full-size decoding", loader_rate(plain), None))
    plain.datasets["train"].min_size = 224  # the project's default: reduced-scale decoding
    rows.append(("reduced-scale decoding (default)", loader_rate(plain), None))
    started = time.perf_counter()
    cached = datamodule(decoded=True)
    rows.append(("data.decoded_cache=true", loader_rate(cached), time.perf_counter() - started))
    base = rows[0][1]
    print(f"### training loader, {len(index.samples['train'])} photos of 4000 x 3000, 224 px, batch 32\n")
    print("| loader | images/s | vs full-size decoding | cache build (s) |")
    print("|---|---|---|---|")
    for name, rate, build in rows:
        print(f"| {name} | {rate:.1f} | {rate / base:.1f}x | {'' if build is None else f'{build:.0f}'} |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
