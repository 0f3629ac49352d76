"""The default data set: download a known source, drop corrupt files, carve the seed's split.

``prepare_dataset`` turns a source into ``root/{train,validation,test}/<class>/`` plus
``root/manifest.csv`` (file, class, split, sha256). It runs when ``carve_state`` says the split is
absent or was interrupted (then it is finished or redone), on global rank zero; other ranks wait
for the manifest. The split is a pure function of the clean image set and the seed: the same
config always yields the same manifest. Fetching the archive is ``datamodules.fetch``'s.
"""

from __future__ import annotations

import csv
import io
import os
import random
import shutil
import time
import urllib.error
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.atomic_io import file_lock, write_bytes_atomic, write_text_atomic
from datamodules.fetch import OFFLINE_HINT, DownloadError, download_and_extract, file_sha256
from datamodules.image_io import IMAGE_EXTENSIONS, bad_reasons, scan_files
from datamodules.layout import MANIFEST, SPLIT_DIRS
from datamodules.near_duplicates import HASH_NAME, MAX_DISTANCE, NearDuplicate, cross_split_pairs, tsv_text

SPLITS = tuple(SPLIT_DIRS.values())  # the seed's folder names
DOWNLOAD_SPLIT = (1000, 500, 500)  # images per class: the seed's 2,000 / 1,000 / 1,000
RANK_ZERO_WAIT_S = 24 * 3600  # how long other ranks wait for global rank zero to prepare the data
POLL_S = 2.0


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

STAGING = ".staging"  # the carve's work folder under root; its manifest.csv is the finished plan
REPORTS = ("bad_files.tsv", "near_duplicates.tsv")


def carve_state(root: str | Path) -> str:
    """Where ``root`` stands: ``done`` (nothing to do), ``absent`` (no split yet: prepare it),
    ``staged`` (a carve was interrupted after its plan was complete: finish moving it into place)
    or ``partial`` (interrupted while staging: discard and carve again). Split folders without a
    staging area are the user's own (a broken layout is scan_splits' to report, never downloaded into)."""
    root = Path(root)
    splits_present = [split for split in SPLITS if (root / split).is_dir()]
    if (root / MANIFEST).is_file() and len(splits_present) == len(SPLITS):
        return "done"  # the manifest is written after the last rename: complete, whatever is left over
    if (root / STAGING).is_dir():
        return "staged" if (root / STAGING / MANIFEST).is_file() else "partial"
    return "done" if splits_present else "absent"


def carve_interrupted(root: str | Path) -> bool:
    """Whether ``root`` holds a carve that was killed part way, which ``prepare_dataset`` finishes:
    its split folders are incomplete until then, so check this before judging the layout."""
    return carve_state(root) in ("staged", "partial")


def _discard_carve(root: Path) -> None:
    """Remove an interrupted carve that never completed its plan. Split folders beside it can only
    be that carve's (an older version renamed them before writing a plan): it is redone whole."""
    for split in SPLITS:
        shutil.rmtree(root / split, ignore_errors=True)
    shutil.rmtree(root / STAGING, ignore_errors=True)


def _finish_carve(root: Path) -> None:
    """Move a complete plan from the staging area into place. Idempotent, so a kill at any point
    is finished by the next call: split folders first (each one rename), the reports, then
    ``manifest.csv`` (its presence means "complete"), and the staging area is removed last."""
    staging = root / STAGING
    for split in SPLITS:
        if (staging / split).is_dir():
            shutil.rmtree(root / split, ignore_errors=True)  # only the plan's own copy can be there
            os.replace(staging / split, root / split)
        elif not (root / split).is_dir():
            raise DownloadError(f"{root / split} is missing and not in {staging}; delete {root} and run again")
    for name in (*REPORTS, MANIFEST):
        write_bytes_atomic(root / name, (staging / name).read_bytes())
    shutil.rmtree(staging)


def carve_split(
    files: dict[str, list[Path]], root: Path, sizes: list[int], seed: int, threads: int = 4
) -> tuple[dict[str, str], list[NearDuplicate]]:
    """Write ``root/{train,validation,test}/<class>/`` and ``root/manifest.csv``.

    Every file is decoded (corrupt ones are left out and listed in ``root/bad_files.tsv``);
    exact duplicates (same sha256) count once, so a picture can never be in two splits; then each
    class is shuffled with ``seed`` and cut into ``sizes`` images per split. Near duplicates that
    land in two splits (re-encoded or resized copies, which sha256 cannot see) are listed in
    ``root/near_duplicates.tsv``, not moved: the split stays a function of the seed. Everything is
    first built in ``root/.staging`` (its manifest last), then moved into place (``_finish_carve``).
    Returns the bad files and the near-duplicate pairs."""
    taken = [split for split in SPLITS if (root / split).exists()]
    if taken:  # never replace folders this carve did not make
        raise DownloadError(f"{root / taken[0]} already exists; move it away or point data.root at an empty folder")
    all_paths = [str(p) for paths in files.values() for p in paths]
    named_bad = {p: "not an image file name" for p in all_paths if not p.lower().endswith(IMAGE_EXTENSIONS)}
    checks = scan_files([p for p in all_paths if p not in named_bad], threads)
    bad = named_bad | bad_reasons(checks)
    hashes: dict[str, list[tuple[str, int]]] = {split: [] for split in SPLITS}
    staging = root / STAGING
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
                shutil.copyfile(path, target)  # into the staging folder, which is renamed whole
                rows.append((f"{split}/{name}/{target.name}", name, split, digest))
                hashes[split].append((f"{split}/{name}/{target.name}", checks[str(path)].dhash))
            start += size
    pairs = cross_split_pairs(hashes)
    bad_text = "file\treason\n" + "".join(f"{path}\t{reason}\n" for path, reason in sorted(bad.items()))
    write_text_atomic(staging / "bad_files.tsv", bad_text)
    write_text_atomic(staging / "near_duplicates.tsv", tsv_text(pairs))
    manifest = io.StringIO()
    writer = csv.writer(manifest)
    writer.writerow(["file", "class", "split", "sha256"])
    writer.writerows(sorted(rows))
    write_text_atomic(staging / MANIFEST, manifest.getvalue())  # last: the plan is complete
    _finish_carve(root)
    return bad, pairs


# --- entry point ------------------------------------------------------------------------------


def _report_counts(root: Path) -> tuple[int, int]:
    """Bad files and near-duplicate pairs listed by a finished carve (for a finished interrupted one)."""
    counts = []
    for name in REPORTS:
        with open(root / name, "rb") as f:
            counts.append(max(sum(1 for _ in f) - 1, 0))
    return counts[0], counts[1]


def prepare_dataset(
    root: str | Path,
    source: str,
    url: str | None,
    sha256: str | None,
    sizes: list[int],
    seed: int,
    is_rank_zero: bool = True,
    log: Callable[[str], None] = print,
) -> None:
    """Make ``root`` hold the source's split, unless it is already there (see ``carve_state``):
    an interrupted carve is finished or redone, so the result equals an uninterrupted run."""
    root = Path(root)
    if source == "none" or carve_state(root) == "done":
        return
    if not is_rank_zero:  # another process prepares the data; wait until it is complete
        deadline = time.time() + RANK_ZERO_WAIT_S
        while carve_state(root) != "done" or not (root / MANIFEST).is_file():
            if time.time() > deadline:
                raise DownloadError(f"gave up waiting for rank zero to prepare {root}")
            time.sleep(POLL_S)
        return
    spec = SOURCES[source]
    work = root / "_download"
    with file_lock(work / "prepare"):  # two runs on one empty root: one prepares, the other finds it done
        state = carve_state(root)
        if state == "done":
            return
        if state == "staged":
            log(f"data.root={root}: finishing an interrupted split from {root / STAGING / MANIFEST}")
            _finish_carve(root)
            bad_count, pair_count = _report_counts(root)
            log(
                f"prepared {root}: {bad_count} corrupt or non-image files left out, {pair_count} near-duplicate "
                f"pair(s) across splits (see bad_files.tsv, near_duplicates.tsv); licence: {spec.licence}"
            )
            return
        if state == "partial":
            log(f"data.root={root}: an interrupted split is discarded and made again")
            _discard_carve(root)
        log(f"data.root={root} has no train/ folder: preparing {spec.description}")
        if source == "kaggle_cats_vs_dogs":
            archive_url = url or spec.url
            expected = spec.sha256 if sha256 == "auto" else sha256
            extracted = work / "extracted"
            if not extracted.is_dir():
                archive = work / Path(urllib.parse.urlparse(archive_url).path).name
                download_and_extract(archive_url, archive, expected, extracted)
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
