"""Export a trained classifier for deployment: TorchScript or ONNX, taking a normalised batch."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from torch import nn

from core.atomic_io import write_bytes_atomic
from core.errors import not_a_choice
from lightning_modules.calibration import to_probabilities
from lightning_modules.classifier import TransferClassifier, flip_averaged
from pipeline.config.schema import EXPORT_FORMATS

# where an export keeps the class names, in output order, as a JSON list
ONNX_CLASS_NAMES_KEY = "class_names"
TORCHSCRIPT_CLASS_NAMES_FILE = "class_names.json"


class ExportedClassifier(nn.Module):
    """The checkpoint's evaluation as one module: normalised images ``(B, 3, S, S)`` -> class
    probabilities, with the model's test-time flip and temperature, as ``stage=test`` and
    ``predict.py`` compute them (the same functions: ``flip_averaged``, ``to_probabilities``)."""

    def __init__(self, model: TransferClassifier):
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        self.binary = bool(model.binary)
        self.tta_flip = bool(model.hparams.tta_flip)
        self.register_buffer("temperature", model.temperature.detach().clone().float())

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images)).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return to_probabilities(flip_averaged(self._logits, images, self.tta_flip) / self.temperature, self.binary)


def export_model(model: TransferClassifier, image_size: int, fmt: str, path: str | Path) -> tuple[Path, float]:
    """Write the model in ``fmt`` as one self-contained file carrying its class names (ONNX metadata
    ``class_names``, TorchScript extra file ``class_names.json``); returns the path and the largest
    difference between the exported model's and PyTorch's probabilities on a random batch."""
    if fmt not in EXPORT_FORMATS:
        raise not_a_choice("export", fmt, EXPORT_FORMATS)
    wrapper = ExportedClassifier(model).eval().cpu()
    example = torch.randn(2, 3, image_size, image_size)
    # ASCII JSON: a class folder name that is not UTF-8 (a surrogate escape) still fits the UTF-8-only
    # ONNX metadata and comes back unchanged from json.loads
    names = json.dumps(list(model.class_names))
    path = Path(path)
    with torch.no_grad():
        if fmt == "torchscript":
            buffer, extra = io.BytesIO(), {TORCHSCRIPT_CLASS_NAMES_FILE: names}
            torch.jit.save(torch.jit.trace(wrapper, example), buffer, _extra_files=extra)
            data = buffer.getvalue()
        else:
            program = torch.onnx.export(
                wrapper,
                (example,),
                input_names=["images"],
                output_names=["probabilities"],
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}},
            )
            program.model.metadata_props[ONNX_CLASS_NAMES_KEY] = names
            # weights inline (no .onnx.data beside it): one file to deploy, written atomically;
            # protobuf caps this at 2 GB, far above the backbones this project trains
            data = program.model_proto.SerializeToString()
    write_bytes_atomic(path, data)
    return path, parity(wrapper, fmt, path, image_size)


def run_exported(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(path)).eval()(images)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def parity(wrapper: nn.Module, fmt: str, path: Path, image_size: int, batch: int = 3) -> float:
    """Largest absolute difference of probabilities, exported vs PyTorch, on one random batch."""
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = wrapper.eval()(images)
    return float((run_exported(fmt, path, images) - expected).abs().max())
