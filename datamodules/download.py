"""The default data set: download a known source, drop corrupt files, carve the seed's split.

``prepare_dataset`` turns a source into ``root/{train,validation,test}/<class>/`` plus
``root/manifest.csv`` (file, class, split, sha256). It runs when ``carve_state`` says the split is
absent or was interrupted (then it is finished or redone), on global rank zero; other ranks wait
for the manifest. The split is a pure function of the clean image set and the seed: the same
config always yields the same manifest.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import os
import random
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

from datamodules.image_io import IMAGE_EXTENSIONS, bad_reasons, scan_files
from datamodules.near_duplicates import HASH_NAME, MAX_DISTANCE, NearDuplicate, cross_split_pairs, tsv_text
from lightning_modules.atomic_io import file_lock, fsync_dir, write_bytes_atomic, write_json_atomic, write_text_atomic
from lightning_modules.errors import UserError

SPLITS = ("train", "validation", "test")
DOWNLOAD_SPLIT = (1000, 500, 500)  # images per class: the seed's 2,000 / 1,000 / 1,000
OFFLINE_HINT = (
    "point data.root at a folder laid out as ROOT/{train,validation,test}/<class>/<images>, "
    "or set data.url to a reachable copy of the archive (file:// works)"
)


class DownloadError(UserError, RuntimeError):
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


def _size_file(part: Path) -> Path:
    """Beside ``<name>.part``: the archive's total size, so a complete part is recognised without a request."""
    return part.with_name(part.name + ".json")


def _recorded_size(part: Path) -> int | None:
    try:
        size = json.loads(_size_file(part).read_text())["size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return size if isinstance(size, int) and size >= 0 else None


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _size_file(part).unlink(missing_ok=True)


def _sha_ok(path: Path, sha256: str | None) -> bool:
    return sha256 is None or file_sha256(path) == sha256.lower()


def _finish(part: Path, dest: Path) -> Path:
    # The part keeps one fixed name so that a later process can resume it, hence a plain rename
    # (after an fsync) rather than atomic_target's per-process temporary file.
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    fsync_dir(dest.parent)
    _size_file(part).unlink(missing_ok=True)
    return dest


def _range_total(headers: Message) -> int | None:
    """The whole file's size from Content-Range (``bytes a-b/N`` on a 206, ``bytes */N`` on a 416)."""
    total = (headers.get("Content-Range") or "").rpartition("/")[2].strip()
    return int(total) if total.isdigit() else None


def _total_size(headers: Message, have: int) -> int | None:
    """The whole file's size: Content-Range's total, else offset + Content-Length."""
    if (total := _range_total(headers)) is not None:
        return total
    length = headers.get("Content-Length")
    return have + int(length) if length is not None and length.strip().isdigit() else None


def _transfer(url: str, part: Path, have: int, expected: int | None, timeout: float) -> int | None:
    """Append to (or, if the server ignores Range, rewrite) ``part``; returns the total size when known."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if have and getattr(response, "status", 200) != 206:  # the server ignored Range: start over
            have = 0
        total = _total_size(response.headers, have)
        if have and None not in (total, expected) and total != expected:
            _discard(part)  # the server's file is not the one this part began as
            raise DownloadError(f"the file changed size on the server ({expected} -> {total} bytes)")
        if total is not None and total != expected:
            write_json_atomic(_size_file(part), {"size": total})
        with open(part, "ab" if have else "wb") as f, _progress(total, part.stem) as bar:
            bar.update(have)
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    return total


def download(url: str, dest: Path, sha256: str | None = None, attempts: int = 4, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` with a progress bar. A broken transfer is resumed from where it
    stopped (HTTP Range) on the next attempt, or on the next call; the size is checked against
    Content-Length, and ``sha256`` when given. A mismatch deletes the file and raises.

    The total size is recorded beside ``<dest>.part`` as soon as it is known, so a part that is
    already complete (a kill before the final rename) is verified and finished without a request:
    re-requesting it would get HTTP 416 on every run. A 416 is handled the same way: the part is
    finished if its size (or sha256) proves it complete, else deleted and fetched again."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if dest.is_file():
        _verify(dest, sha256)
        return dest
    last_error: Exception | None = None
    for attempt in range(attempts):
        have = part.stat().st_size if part.is_file() else 0
        expected = _recorded_size(part)
        if have and expected is not None and have >= expected:
            if have == expected and _sha_ok(part, sha256):
                return _finish(part, dest)
            _discard(part)  # longer than the file, or not its bytes: start over
            have = 0
        try:
            total = _transfer(url, part, have, expected, timeout)
        except urllib.error.HTTPError as err:
            last_error = err
            if err.code == 416 and have:  # nothing left to send: the part may already be complete
                known = expected if expected is not None else _range_total(err.headers)
                provable = known == have if known is not None else sha256 is not None
                if provable and _sha_ok(part, sha256):
                    return _finish(part, dest)
                _discard(part)
                continue  # start over at once: the server is reachable
        except (DownloadError, urllib.error.URLError, OSError, http.client.HTTPException) as err:
            last_error = err  # includes a connection cut mid-transfer (IncompleteRead)
        else:
            size = part.stat().st_size
            if total is None or size == total:
                got = file_sha256(part) if sha256 is not None else None
                if got is not None and got != sha256.lower():
                    _discard(part)  # a wrong archive is not retried: the pinned checksum decides
                    raise DownloadError(
                        f"checksum mismatch for {dest.name}: expected sha256 {sha256}, got {got}; file deleted"
                    )
                return _finish(part, dest)
            last_error = DownloadError(f"incomplete: {size} of {total} bytes")
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

STAGING = ".staging"  # the carve's work folder under root; its manifest.csv is the finished plan
MANIFEST = "manifest.csv"
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


def _download_and_extract(url: str, dest: Path, sha256: str | None, extracted: Path) -> None:
    """The archive, extracted into ``extracted``. An archive that cannot be read as a zip (a
    truncated file, an error page saved under its name) is deleted with any partial extraction
    and fetched once more, so it cannot block every later run."""
    scratch = extracted.with_name(extracted.name + ".tmp")
    for attempt in range(2):
        archive = download(url, dest, sha256)
        shutil.rmtree(scratch, ignore_errors=True)  # a killed extraction's leftovers
        try:
            extract_zip(archive, scratch)
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            shutil.rmtree(scratch, ignore_errors=True)
            archive.unlink(missing_ok=True)
            if attempt:
                raise DownloadError(
                    f"{dest.name} from {url} is not a readable zip archive ({err}), also when downloaded again; "
                    "check data.url (the file was deleted)"
                ) from None
            continue
        os.replace(scratch, extracted)  # a whole folder: present means fully extracted
        return


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
    wait_s: float = 24 * 3600,
    log: Callable[[str], None] = print,
) -> None:
    """Make ``root`` hold the source's split, unless it is already there (see ``carve_state``):
    an interrupted carve is finished or redone, so the result equals an uninterrupted run."""
    root = Path(root)
    if source == "none" or carve_state(root) == "done":
        return
    if source not in SOURCES:
        raise DownloadError(f"data.source={source!r} is not valid; choose one of: {', '.join(SOURCE_NAMES)}")
    if not is_rank_zero:  # another process prepares the data; wait until it is complete
        deadline = time.time() + wait_s
        while carve_state(root) != "done" or not (root / MANIFEST).is_file():
            if time.time() > deadline:
                raise DownloadError(f"gave up waiting for rank zero to prepare {root}")
            time.sleep(2)
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
                _download_and_extract(archive_url, archive, expected, extracted)
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
