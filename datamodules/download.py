"""The default data set: download a known source, drop corrupt files, carve the seed's split.

``prepare_dataset`` turns a source into ``root/{train,validation,test}/<class>/`` plus
``root/manifest.csv`` (file, class, split, sha256). It only runs when ``root/train`` is missing, on
global rank zero; other ranks wait for the manifest. The split is a pure function of the clean
image set and the seed: the same config always yields the same manifest.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import os
import random
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datamodules.image_io import IMAGE_EXTENSIONS, bad_reasons, scan_files
from datamodules.near_duplicates import HASH_NAME, MAX_DISTANCE, NearDuplicate, cross_split_pairs, tsv_text

SPLITS = ("train", "validation", "test")
DOWNLOAD_SPLIT = (1000, 500, 500)  # images per class: the seed's 2,000 / 1,000 / 1,000
OFFLINE_HINT = (
    "point data.root at a folder laid out as ROOT/{train,validation,test}/<class>/<images>, "
    "or set data.url to a reachable copy of the archive (file:// works)"
)


class DownloadError(RuntimeError):
    """A download or preparation failure; the message is one line saying what to do."""


@dataclass(frozen=True)
class Source:
    name: str
    url: str | None
    sha256: str | None  # None: not pinned (see the README)
    description: str
    licence: str


SOURCES: dict[str, Source] = {
    "kaggle_cats_vs_dogs": Source(
        "kaggle_cats_vs_dogs",
        "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip",
        # Microsoft publishes no checksum for kagglecatsanddogs_5340.zip and none could be fetched
        # here; pin one with data.sha256=... after a first trusted download.
        None,
        "Kaggle Dogs vs. Cats (Asirra) images published by Microsoft: 25,000 JPEGs, about 787 MB",
        "Microsoft Research Open Data / Kaggle competition data: research use, see the download page (id 54765)",
    ),
    "oxford_pets": Source(
        "oxford_pets",
        None,
        None,
        "Oxford-IIIT Pet, cats vs dogs (torchvision's downloader), about 800 MB",
        "Creative Commons Attribution-ShareAlike 4.0 (the Oxford-IIIT Pet data set)",
    ),
    "oxford_pets_breeds": Source(
        "oxford_pets_breeds",
        None,
        None,
        "Oxford-IIIT Pet, 37 breeds (torchvision's downloader)",
        "Creative Commons Attribution-ShareAlike 4.0 (the Oxford-IIIT Pet data set)",
    ),
}
SOURCE_NAMES = (*SOURCES, "none")


# --- download ------------------------------------------------------------------------------


def _progress(total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False, disable=None)


def download(url: str, dest: Path, sha256: str | None = None, attempts: int = 4, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` with a progress bar. A broken transfer is resumed from where it
    stopped (HTTP Range) on the next attempt, or on the next call; the size is checked against
    Content-Length, and ``sha256`` when given. A mismatch deletes the file and raises."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if dest.is_file():
        _verify(dest, sha256)
        return dest
    last_error: Exception | None = None
    for attempt in range(attempts):
        have = part.stat().st_size if part.is_file() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status = getattr(response, "status", 200)
                if have and status != 206:  # the server ignored Range: start over
                    have = 0
                length = response.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with open(part, "ab" if have else "wb") as f, _progress(total, dest.name) as bar:
                    bar.update(have)
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            if total is not None and part.stat().st_size != total:
                raise DownloadError(f"incomplete: {part.stat().st_size} of {total} bytes")
            _verify(part, sha256)
            os.replace(part, dest)
            return dest
        except DownloadError as err:
            if "checksum" in str(err):
                raise
            last_error = err
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            last_error = err  # includes a connection cut mid-transfer (IncompleteRead)
        time.sleep(min(0.2 * 2**attempt, 5.0))
    reason = getattr(last_error, "reason", last_error)
    raise DownloadError(f"could not download {url} ({reason}); {OFFLINE_HINT}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, sha256: str | None) -> None:
    if sha256 is None:
        return
    got = file_sha256(path)
    if got != sha256.lower():
        path.unlink(missing_ok=True)
        raise DownloadError(f"checksum mismatch for {path.name}: expected sha256 {sha256}, got {got}; file deleted")


def extract_zip(archive: Path, target: Path) -> Path:
    """Extract ``archive`` into ``target`` (members may not escape it)."""
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        root = target.resolve()
        for member in zf.infolist():
            if not (root / member.filename).resolve().is_relative_to(root):
                raise DownloadError(f"{archive.name}: member {member.filename!r} escapes the target folder")
        zf.extractall(target)
    return target


# --- sources -> labelled file lists -----------------------------------------------------------


def petimages_files(extracted: Path) -> dict[str, list[Path]]:
    """``PetImages/Cat`` and ``PetImages/Dog`` (Microsoft's archive) as classes ``cats``, ``dogs``."""
    out = {}
    for folder, name in (("Cat", "cats"), ("Dog", "dogs")):
        matches = list(extracted.rglob(f"PetImages/{folder}"))
        if not matches:
            raise DownloadError(f"the archive has no PetImages/{folder}/ folder; is data.url the right archive?")
        out[name] = sorted(p for p in matches[0].iterdir() if p.is_file())
    return out


def oxford_files(download_dir: Path, breeds: bool) -> dict[str, list[Path]]:
    """Oxford-IIIT Pet through torchvision's downloader: cats vs dogs, or the 37 breeds."""
    from torchvision.datasets import OxfordIIITPet

    out: dict[str, list[Path]] = {}
    for split in ("trainval", "test"):
        try:
            data = OxfordIIITPet(
                str(download_dir), split=split, download=True, target_types="category" if breeds else "binary-category"
            )
        except (urllib.error.URLError, OSError, RuntimeError) as err:
            raise DownloadError(f"could not download Oxford-IIIT Pet ({err}); {OFFLINE_HINT}") from None
        names = [c.replace(" ", "_") for c in data.classes] if breeds else ["cats", "dogs"]
        for path, label in zip(data._images, data._labels if breeds else data._bin_labels):
            out.setdefault(names[label], []).append(Path(path))
    return {name: sorted(files) for name, files in sorted(out.items())}


# --- clean, deduplicate, split ----------------------------------------------------------------


def carve_split(
    files: dict[str, list[Path]], root: Path, sizes: list[int], seed: int, threads: int = 4
) -> tuple[dict[str, str], list[NearDuplicate]]:
    """Write ``root/{train,validation,test}/<class>/`` and ``root/manifest.csv``.

    Every file is decoded (corrupt ones are left out and listed in ``root/bad_files.tsv``);
    exact duplicates (same sha256) count once, so a picture can never be in two splits; then each
    class is shuffled with ``seed`` and cut into ``sizes`` images per split. Near duplicates that
    land in two splits (re-encoded or resized copies, which sha256 cannot see) are listed in
    ``root/near_duplicates.tsv``, not moved: the split stays a function of the seed. Returns the
    bad files and the near-duplicate pairs."""
    all_paths = [str(p) for paths in files.values() for p in paths]
    named_bad = {p: "not an image file name" for p in all_paths if not p.lower().endswith(IMAGE_EXTENSIONS)}
    checks = scan_files([p for p in all_paths if p not in named_bad], threads)
    bad = named_bad | bad_reasons(checks)
    hashes: dict[str, list[tuple[str, int]]] = {split: [] for split in SPLITS}
    staging = root / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    rows, seen = [], set()
    for name, paths in files.items():
        unique: dict[str, Path] = {}
        for path in paths:
            if str(path) in bad:
                continue
            digest = file_sha256(path)
            if digest not in seen:  # duplicates across classes are dropped after the first class
                unique.setdefault(digest, path)
            seen.add(digest)
        ordered = sorted(unique.items())  # by content hash: independent of file names and listing order
        random.Random(f"{seed}:{name}").shuffle(ordered)
        if len(ordered) < sum(sizes):
            raise DownloadError(
                f"class {name!r} has {len(ordered)} clean, distinct images, fewer than data.split_sizes={sizes} needs"
            )
        start = 0
        for split, size in zip(SPLITS, sizes):
            folder = staging / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for digest, path in ordered[start : start + size]:
                target = folder / f"{name}.{digest[:12]}{path.suffix.lower()}"
                shutil.copyfile(path, target)
                rows.append((f"{split}/{name}/{target.name}", name, split, digest))
                hashes[split].append((f"{split}/{name}/{target.name}", checks[str(path)].dhash))
            start += size
    for split in SPLITS:
        os.replace(staging / split, root / split)
    staging.rmdir()
    with open(root / "bad_files.tsv", "w") as f:
        f.write("file\treason\n")
        f.writelines(f"{path}\t{reason}\n" for path, reason in sorted(bad.items()))
    pairs = cross_split_pairs(hashes)
    (root / "near_duplicates.tsv").write_text(tsv_text(pairs))
    tmp = root / "manifest.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "class", "split", "sha256"])
        writer.writerows(sorted(rows))
    os.replace(tmp, root / "manifest.csv")  # written last: its presence means "complete"
    return bad, pairs


# --- entry point ------------------------------------------------------------------------------


def prepare_dataset(
    root: str | Path,
    source: str,
    url: str | None,
    sha256: str | None,
    sizes: list[int],
    seed: int,
    is_rank_zero: bool = True,
    wait_s: float = 24 * 3600,
    log: Callable[[str], None] = print,
) -> None:
    """Make ``root`` hold the source's split, unless ``root/train`` already exists."""
    root = Path(root)
    if (root / "train").is_dir() or source == "none":
        return
    if source not in SOURCES:
        raise DownloadError(f"data.source={source!r} is not valid; choose one of: {', '.join(SOURCE_NAMES)}")
    if not is_rank_zero:  # another process prepares the data; wait for its manifest
        deadline = time.time() + wait_s
        while not (root / "manifest.csv").is_file():
            if time.time() > deadline:
                raise DownloadError(f"gave up waiting for rank zero to prepare {root}")
            time.sleep(2)
        return
    spec = SOURCES[source]
    work = root / "_download"
    log(f"data.root={root} has no train/ folder: preparing {spec.description}")
    if source == "kaggle_cats_vs_dogs":
        archive_url = url or spec.url
        expected = spec.sha256 if sha256 == "auto" else sha256
        archive = download(archive_url, work / Path(urllib.parse.urlparse(archive_url).path).name, expected)
        extracted = work / "extracted"
        if not extracted.is_dir():
            extract_zip(archive, extracted.with_name("extracted.tmp"))
            os.replace(extracted.with_name("extracted.tmp"), extracted)
        files = petimages_files(extracted)
    else:
        files = oxford_files(work, breeds=source == "oxford_pets_breeds")
    bad, pairs = carve_split(files, root, sizes, seed)
    log(
        f"prepared {root}: {len(files)} classes x {sizes} images (train/validation/test); "
        f"{len(bad)} corrupt or non-image files left out (listed in {root / 'bad_files.tsv'}); "
        f"licence: {spec.licence}"
    )
    log(
        f"near-duplicate check: {len(pairs)} image pair(s) across splits ({HASH_NAME}, distance <= {MAX_DISTANCE}), "
        f"listed in {root / 'near_duplicates.tsv'}"
        + ("; data.drop_near_duplicates=true removes them from validation/test" if pairs else "")
    )
