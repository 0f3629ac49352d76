"""Pictures for TensorBoard, drawn with PIL (no plotting library needed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid


def denormalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised float images ``(N, 3, H, W)`` back to uint8 as the model's input looked."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return ((images * std_t + mean_t).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def captioned_grid(images: torch.Tensor, captions: list[str], tile: int = 128, nrow: int = 4) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` images, each resized to ``tile`` px with its caption below: ``(3, H, W)``."""
    font = _font()
    tiles = []
    for image, caption in zip(images, captions):
        pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((tile, tile))
        canvas = Image.new("RGB", (tile, tile + 30), (255, 255, 255))
        canvas.paste(pil, (0, 0))
        ImageDraw.Draw(canvas).multiline_text((3, tile + 1), caption, fill=(0, 0, 0), font=font, spacing=1)
        tiles.append(torch.from_numpy(np.asarray(canvas)).permute(2, 0, 1))
    return make_grid(torch.stack(tiles), nrow=nrow, padding=4, pad_value=200)


def confusion_matrix_image(matrix: torch.Tensor, class_names: list[str], cell: int = 48) -> torch.Tensor:
    """A confusion matrix (rows: true class, columns: predicted) as a ``(3, H, W)`` uint8 picture."""
    font = _font()
    n = len(class_names)
    label_w, top = 110, 40
    canvas = Image.new("RGB", (max(label_w + n * cell + 10, 320), top + n * cell + 10), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    counts = matrix.cpu().numpy()
    row_sums = counts.sum(axis=1, keepdims=True).clip(min=1)
    draw.text((label_w, 4), "predicted ->   (rows: true class)", fill=(0, 0, 0), font=font)
    for j, name in enumerate(class_names):
        draw.text((label_w + j * cell + 2, top - 16), name[:7], fill=(0, 0, 0), font=font)
    for i, name in enumerate(class_names):
        draw.text((4, top + i * cell + cell // 2 - 6), name[:16], fill=(0, 0, 0), font=font)
        for j in range(n):
            share = counts[i, j] / row_sums[i, 0]
            shade = int(255 - 200 * share)
            x, y = label_w + j * cell, top + i * cell
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=(shade, shade, 255))
            colour = (255, 255, 255) if share > 0.6 else (0, 0, 0)
            draw.text((x + 4, y + cell // 2 - 6), str(int(counts[i, j])), fill=colour, font=font)
    return torch.from_numpy(np.asarray(canvas)).permute(2, 0, 1)
