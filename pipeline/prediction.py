"""``predict.py``: classify image files or folders with a checkpoint, write a CSV; export."""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

from core.atomic_io import check_writable, write_text_atomic
from core.errors import ConfigError, UserError, first_line, os_error_line
from datamodules.image_folder import default_num_workers
from datamodules.image_io import IMAGE_EXTENSIONS, load_rgb
from datamodules.transforms import backbone_eval_transform
from lightning_modules.cam import cam_available, cam_target, gradcam, overlay
from lightning_modules.classifier import TransferClassifier
from lightning_modules.lora import merge_adapters
from pipeline.config.load import parse_overrides
from pipeline.config.schema import PredictConfig, check_values
from pipeline.export import export_model
from pipeline.inference import CLEAN, predict_variants
from pipeline.runner.checkpoints import model_from_checkpoint


def load_predict_config(argv: list[str]) -> PredictConfig:
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(PredictConfig), parse_overrides(argv))
        OmegaConf.to_object(cfg)  # raises on a missing ckpt_path
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "?")
        raise ConfigError(f"predict.py: bad or missing key '{key}': {first_line(err)} (see --help)") from None
    check_values(cfg, PredictConfig)
    if not cfg.inputs and not cfg.export:
        raise ConfigError("predict.py needs inputs=PATH_OR_GLOB (and/or export=onnx|torchscript)")
    if cfg.cam_dir and not cam_available():
        raise ConfigError("cam_dir needs the grad-cam package: pip install -e '.[cam]'")
    return cfg


def collect_files(inputs: str) -> list[str]:
    """A file; every image file under a folder (recursively); or the matches of a glob."""
    path = Path(inputs)
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            raise ConfigError(f"inputs={inputs} holds no image files ({', '.join(IMAGE_EXTENSIONS)}), in any subfolder")
        return found
    if path.is_file():
        return [str(path)]
    matches = sorted(p for p in glob.glob(inputs, recursive=True) if os.path.isfile(p))
    if not matches:
        raise ConfigError(f"inputs={inputs} matches no file")
    return matches


def load_model(ckpt_path: str) -> TransferClassifier:
    """The checkpoint alone is enough: backbone, class names and image size are in it; LoRA adapters
    (finetune.method=lora) are merged into their layers, as inference and exports want them."""
    model = model_from_checkpoint(ckpt_path).eval()
    merge_adapters(model)
    return model


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def predict_files(
    model: TransferClassifier,
    files: list[str],
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
    cam_dir: str | None = None,
    progress: bool = False,
) -> list[tuple[str, str, list[float], str]]:
    """Rows ``(file, predicted, probabilities, error)`` in input order, computed by the evaluation's
    own inference loop (``pipeline.inference.predict_variants``: its CPU batch rule, test-time
    flip and temperature as the checkpoint has them); with ``cam_dir``, a Grad-CAM overlay of each
    readable image at its own size. ``progress``: a bar on a terminal, else a line per ~10% (``core.progress``)."""
    if cam_dir:  # a model Grad-CAM cannot read is refused before the predictions, not after
        cam_target(model.backbone, int(model.hparams.image_size))
    samples = [(f, 0) for f in files]
    pred = predict_variants(
        model, samples, [(CLEAN, 0)], 0, device, batch_size, num_workers, progress="predict" if progress else None
    )
    probs = model.probabilities(pred.logits[0])
    rows = [
        (file, model.class_names[int(p.argmax())], p.tolist(), "") if not error else (file, "", [], error)
        for file, p, error in zip(files, probs, pred.errors)
    ]
    if cam_dir:
        _write_cams(model, files, [row[1] for row in rows], Path(cam_dir), batch_size, device)
    return rows


def _write_cams(
    model: TransferClassifier,
    files: list[str],
    predicted: list[str],
    folder: Path,
    batch_size: int,
    device: torch.device | str,
) -> None:
    """Grad-CAM of each readable image for its predicted class (gradients: a pass of its own)."""
    size = int(model.hparams.image_size)
    transform = backbone_eval_transform(model.backbone, size)
    readable = [(f, model.class_names.index(c)) for f, c in zip(files, predicted) if c]
    written: set[str] = set()
    model.to(device)
    for start in range(0, len(readable), batch_size):
        chunk = readable[start : start + batch_size]
        images = torch.stack([transform(load_rgb(f, size)) for f, _ in chunk]).to(device)
        for (file, _), mask in zip(chunk, gradcam(model, images, [c for _, c in chunk], model.binary)):
            _write_cam(folder, file, mask, written)


def _write_cam(folder: Path, file: str, mask, written: set[str]) -> None:
    """``<stem>.gradcam.png`` (numbered if two inputs share a stem): the overlay on the image as read."""
    name, n = f"{Path(file).stem}.gradcam.png", 1
    while name in written:
        name, n = f"{Path(file).stem}.{n}.gradcam.png", n + 1
    written.add(name)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(np.asarray(load_rgb(file)), mask)).save(folder / name)


class PredictionsMoved(UserError):
    """``output=`` could not be written at the end; the predictions went to another file (named)."""

    exit_code = 3


def check_output(output: str) -> None:
    """Before any image is classified: ``output=`` names a file in a folder this process can write."""
    target = Path(output)
    if target.is_dir():
        raise ConfigError(f"output={output} is a folder; name a file in it, e.g. output={target / 'predictions.csv'}")
    check_writable(target.parent, f"{target.parent or '.'} (output={output})")


def save_predictions(output: str, class_names: list[str], rows: list[tuple[str, str, list[float], str]]) -> None:
    """``write_csv`` to ``output``; if that fails now (the folder went read-only, the disk filled),
    the predictions are written to the working folder or the temporary folder instead, and the
    error names that file: hours of classification are not lost to the last write."""
    try:
        write_csv(output, class_names, rows)
        return
    except OSError as err:
        failure = err
    name = f"predictions-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.csv"
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        with contextlib.suppress(OSError):
            write_csv(folder / name, class_names, rows)
            raise PredictionsMoved(
                f"cannot write output={output}: {os_error_line(failure)}; "
                f"the {len(rows)} predictions were written to {folder / name} instead"
            )
    raise failure


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
    if cfg.inputs:  # before the model is loaded: a bad output or an empty folder is found in a second
        check_output(cfg.output)
        files = collect_files(cfg.inputs)
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
        device = pick_device(cfg.device)
        started = time.time()
        workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
        rows = predict_files(model, files, cfg.batch_size, workers, device, cfg.cam_dir, progress=True)
        seconds = time.time() - started
        save_predictions(cfg.output, model.class_names, rows)
        counts = Counter(r[1] for r in rows if not r[3])
        errors = sum(1 for r in rows if r[3])
        per_class = ", ".join(f"{c} {counts.get(c, 0)}" for c in model.class_names)
        print(
            f"classified {len(files) - errors} of {len(files)} files in {seconds:.1f}s on {device} "
            f"({len(files) / max(seconds, 1e-9):.1f} images/s; "
            f"{per_class}; unreadable {errors}); wrote {cfg.output}"
        )
        result["predictions"] = {"files": len(files), "errors": errors, "counts": dict(counts), "csv": cfg.output}
    return result
