"""Export a trained classifier for deployment: TorchScript or ONNX, taking a normalised batch."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

EXPORT_FORMATS = ("onnx", "torchscript")
# float32 on the same inputs: only kernel choice and summation order differ
PARITY_TOLERANCE = 1e-4


class ExportedClassifier(nn.Module):
    """Backbone + head in eval mode: normalised images ``(B, 3, S, S)`` -> class probabilities."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        self.binary = bool(model.binary)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(images)).float()
        if self.binary:
            positive = torch.sigmoid(logits[:, 0])
            return torch.stack([1 - positive, positive], dim=1)
        return logits.softmax(dim=1)


def export_model(model: nn.Module, image_size: int, fmt: str, path: str | Path) -> tuple[Path, float]:
    """Write the model in ``fmt``; returns the path and the largest difference between the
    exported model's and PyTorch's probabilities on a random batch."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export={fmt!r} is not valid; choose one of: {', '.join(EXPORT_FORMATS)}")
    wrapper = ExportedClassifier(model).eval().cpu()
    example = torch.randn(2, 3, image_size, image_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(wrapper, example), str(path))
        else:
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                input_names=["images"],
                output_names=["probabilities"],
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}},
            )
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
