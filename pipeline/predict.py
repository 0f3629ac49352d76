"""``predict.py``: classify image files or folders with a checkpoint, write a CSV; export."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader, Dataset

from datamodules.image_folder import default_num_workers
from datamodules.image_io import IMAGE_EXTENSIONS, load_rgb
from datamodules.transforms import eval_transform
from lightning_modules.atomic_io import write_text_atomic
from lightning_modules.cam import cam_available, gradcam, overlay
from lightning_modules.classifier import TransferClassifier
from pipeline.config import ConfigError, parse_overrides
from pipeline.export import EXPORT_FORMATS, export_model
from pipeline.stages import model_from_checkpoint


@dataclass
class PredictConfig:
    ckpt_path: str = MISSING
    inputs: str | None = None  # a file, a folder (searched recursively) or a glob
    output: str = "predictions.csv"
    batch_size: int = 32
    num_workers: int | None = None
    device: str = "auto"  # auto: cuda if available, else cpu
    export: str | None = None  # onnx | torchscript
    export_path: str | None = None  # default: next to the checkpoint
    cam_dir: str | None = None  # write a Grad-CAM overlay PNG per image here (pip install -e ".[cam]")


def load_predict_config(argv: list[str]) -> PredictConfig:
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(PredictConfig), parse_overrides(argv))
        OmegaConf.to_object(cfg)  # raises on a missing ckpt_path
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "?")
        raise ConfigError(f"predict.py: bad or missing key '{key}': {str(err).splitlines()[0]}") from None
    if not cfg.inputs and not cfg.export:
        raise ConfigError("predict.py needs inputs=PATH_OR_GLOB (and/or export=onnx|torchscript)")
    if cfg.cam_dir and not cam_available():
        raise ConfigError("cam_dir needs the grad-cam package: pip install -e '.[cam]'")
    if cfg.export and cfg.export not in EXPORT_FORMATS:
        raise ConfigError(f"export={cfg.export!r} is not valid; choose one of: {', '.join(EXPORT_FORMATS)}")
    return cfg


def collect_files(inputs: str) -> list[str]:
    """A file; every image file under a folder (recursively); or the matches of a glob."""
    path = Path(inputs)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
    if path.is_file():
        return [str(path)]
    matches = sorted(p for p in glob.glob(inputs, recursive=True) if os.path.isfile(p))
    if not matches:
        raise ConfigError(f"inputs={inputs} matches no file")
    return matches


class _Files(Dataset):
    def __init__(self, files: list[str], transform, size: int):
        self.files, self.transform, self.size = files, transform, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            return self.transform(load_rgb(self.files[index], self.size)), index, ""
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported in the CSV
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            return torch.zeros(3, self.size, self.size), index, reason


def load_model(ckpt_path: str) -> TransferClassifier:
    """The checkpoint alone is enough: backbone, class names and image size are in it."""
    return model_from_checkpoint(ckpt_path).eval()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def predict_files(
    model: TransferClassifier, files: list[str], batch_size: int, num_workers: int, device, cam_dir: str | None = None
):
    """Rows ``(file, predicted, probabilities, error)`` in input order; with ``cam_dir``, a
    Grad-CAM overlay of each readable image at its own size."""
    size = int(model.hparams.image_size)
    transform = eval_transform(size, model.backbone.mean, model.backbone.std, model.backbone.interpolation)
    dataset = _Files(files, transform, size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    model.to(device)
    rows: list[tuple[str, str, list[float], str]] = [("", "", [], "")] * len(files)
    written: set[str] = set()
    for images, indices, errors in loader:
        # logits(): the checkpoint's own evaluation, test-time flip included when it was trained with it
        probs = model.probabilities(model.logits(images.to(device))).cpu()
        for p, i, err in zip(probs, indices.tolist(), errors):
            if err:
                rows[i] = (files[i], "", [], err)
            else:
                rows[i] = (files[i], model.class_names[int(p.argmax())], p.tolist(), "")
        if cam_dir:
            good = [k for k, err in enumerate(errors) if not err]
            if good:
                maps = gradcam(model, images[good].to(device), probs[good].argmax(1).tolist(), model.binary)
                for k, mask in zip(good, maps):
                    _write_cam(Path(cam_dir), files[int(indices[k])], mask, written)
    return rows


def _write_cam(folder: Path, file: str, mask, written: set[str]) -> None:
    """``<stem>.gradcam.png`` (numbered if two inputs share a stem): the overlay on the image as read."""
    import numpy as np
    from PIL import Image

    name, n = f"{Path(file).stem}.gradcam.png", 1
    while name in written:
        name, n = f"{Path(file).stem}.{n}.gradcam.png", n + 1
    written.add(name)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(np.asarray(load_rgb(file)), mask)).save(folder / name)


def write_csv(path: str | Path, class_names: list[str], rows: list[tuple[str, str, list[float], str]]) -> None:
    """The predictions CSV, written whole or not at all; a file name that is not UTF-8 keeps its bytes."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["file", "predicted", *[f"prob_{c}" for c in class_names], "error"])
    for file, predicted, probs, error in rows:
        writer.writerow([file, predicted, *([f"{p:.6f}" for p in probs] or [""] * len(class_names)), error])
    write_text_atomic(path, out.getvalue())


def main(argv: list[str]) -> dict:
    cfg = load_predict_config(argv)
    model = load_model(cfg.ckpt_path)
    result: dict = {}
    if cfg.export:
        suffix = ".onnx" if cfg.export == "onnx" else ".torchscript.pt"
        target = cfg.export_path or str(Path(cfg.ckpt_path).with_suffix(suffix))
        path, diff = export_model(model, int(model.hparams.image_size), cfg.export, target)
        print(f"exported {cfg.export} to {path}; largest probability difference vs PyTorch: {diff:.2e}")
        # as JSON, as stored in the export: escaped, so any class folder name prints on any terminal
        print(f"class names, in output order: {json.dumps(list(model.class_names))}")
        result["export"] = {"path": str(path), "max_abs_diff": diff, "class_names": list(model.class_names)}
    if cfg.inputs:
        files = collect_files(cfg.inputs)
        device = pick_device(cfg.device)
        started = time.time()
        workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
        rows = predict_files(model, files, cfg.batch_size, workers, device, cfg.cam_dir)
        write_csv(cfg.output, model.class_names, rows)
        counts = Counter(r[1] for r in rows if not r[3])
        errors = sum(1 for r in rows if r[3])
        per_class = ", ".join(f"{c} {counts.get(c, 0)}" for c in model.class_names)
        print(
            f"classified {len(files) - errors} of {len(files)} files in {time.time() - started:.1f}s on {device} "
            f"({per_class}; unreadable {errors}); wrote {cfg.output}"
        )
        result["predictions"] = {"files": len(files), "errors": errors, "counts": dict(counts), "csv": cfg.output}
    return result
