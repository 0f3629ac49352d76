"""Pictures for TensorBoard, drawn with PIL (no plotting library needed)."""

from __future__ import annotations

import io
import math
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
    """uint8 ``(N, 3, H, W)`` images, each resized to ``tile`` px with its caption below: ``(3, H, W)``;
    at least ``nrow`` per row, more for many images (a square grid, not a tall strip)."""
    nrow = max(nrow, math.ceil(math.sqrt(len(images))))
    font = _font()
    tiles = []
    for image, caption in zip(images, captions):
        pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((tile, tile))
        canvas = Image.new("RGB", (tile, tile + 30), (255, 255, 255))
        canvas.paste(pil, (0, 0))
        ImageDraw.Draw(canvas).multiline_text((3, tile + 1), caption, fill=(0, 0, 0), font=font, spacing=1)
        tiles.append(torch.from_numpy(np.array(canvas)).permute(2, 0, 1))
    return make_grid(torch.stack(tiles), nrow=nrow, padding=4, pad_value=200)


# Beyond this many classes the matrix shows the most-confused ones only: a full one is unreadable,
# and its cost grows with the square (200 classes: a 10,000 px square, gigabytes in TensorBoard's encoder).
MAX_MATRIX_CLASSES = 30


def most_confused(matrix: torch.Tensor, limit: int) -> list[int]:
    """The ``limit`` classes with the most errors (their images predicted wrong, or other images
    predicted as them), in class order; ties keep the lower index."""
    errors = matrix.sum(0) + matrix.sum(1) - 2 * matrix.diagonal()
    return sorted(torch.argsort(errors, descending=True, stable=True)[:limit].tolist())


def confusion_matrix_image(
    matrix: torch.Tensor, class_names: list[str], cell: int = 48, max_classes: int = MAX_MATRIX_CLASSES
) -> torch.Tensor:
    """A confusion matrix (rows: true class, columns: predicted) as a ``(3, H, W)`` uint8 picture; of
    more than ``max_classes`` classes, the ``max_classes`` most confused (shares stay of the whole row)."""
    font = _font()
    counts = matrix.cpu().numpy()
    row_sums = counts.sum(axis=1, keepdims=True).clip(min=1)
    title = "predicted ->   (rows: true class)"
    if len(class_names) > max_classes:
        keep = most_confused(matrix.cpu(), max_classes)
        title = f"the {max_classes} most-confused of {len(class_names)} classes; " + title
        counts, row_sums = counts[np.ix_(keep, keep)], row_sums[keep]
        class_names = [class_names[i] for i in keep]
    n = len(class_names)
    label_w, top = 110, 40
    canvas = Image.new("RGB", (max(label_w + n * cell + 10, 320), top + n * cell + 10), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((label_w, 4), title, fill=(0, 0, 0), font=font)
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
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1)


def _bins(confidence: torch.Tensor, hit: torch.Tensor, n_bins: int) -> list[tuple[float, float, int]]:
    """(mean confidence, observed frequency, count) of each equal-width confidence bin."""
    edges = torch.linspace(0, 1, n_bins + 1)
    index = torch.bucketize(confidence.clamp(0, 1), edges[1:-1], right=True)
    rows = []
    for b in range(n_bins):
        mask = index == b
        n = int(mask.sum())
        rows.append((float(confidence[mask].mean()) if n else 0.0, float(hit[mask].float().mean()) if n else 0.0, n))
    return rows


def reliability_diagram(
    before: torch.Tensor, after: torch.Tensor, targets: torch.Tensor, binary: bool, n_bins: int, title: str
) -> Image.Image:
    """Reliability diagrams before / after temperature scaling (one panel when they are the same
    probabilities, T=1): per confidence bin, the observed frequency (bar, with the bin's image count
    above it) against the diagonal of perfect calibration, with ticks at every 0.2. The binned
    quantity is the one torchmetrics' ECE uses: P(second class) vs its frequency for two classes,
    the top-label confidence vs accuracy otherwise."""
    font = _font()
    size, left, right, top, bottom = 240, 44, 16, 56, 40
    panels = [("before scaling", before), ("after scaling", after)] if not torch.equal(before, after) else [("", after)]
    width = max(len(panels) * (left + size + right), 440)
    canvas = Image.new("RGB", (width, top + size + bottom), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill=(0, 0, 0), font=font)
    draw.text((4, 20), "bars: observed frequency per bin, red: images per bin", fill=(90, 90, 90), font=font)
    x_name, y_name = ("P(second class)", "frequency") if binary else ("confidence", "accuracy")
    for panel, (name, probs) in enumerate(panels):
        if binary:
            confidence, hit = probs[:, 1], targets == 1
        else:
            confidence, predicted = probs.max(dim=1)
            hit = predicted == targets
        x0, y0 = panel * (left + size + right) + left, top
        draw.text((x0 + size // 2 - 30, y0 - 16), name, fill=(0, 0, 0), font=font)
        draw.rectangle([x0, y0, x0 + size, y0 + size], outline=(0, 0, 0))
        draw.line([x0, y0 + size, x0 + size, y0], fill=(180, 180, 180), width=1)
        for tick in range(6):  # 0, 0.2, ..., 1 on both axes
            x, y = x0 + tick * size / 5, y0 + size - tick * size / 5
            draw.line([x, y0 + size, x, y0 + size + 4], fill=(0, 0, 0))
            draw.text((x - 8, y0 + size + 5), f"{tick / 5:.1f}", fill=(0, 0, 0), font=font)
            draw.line([x0 - 4, y, x0, y], fill=(0, 0, 0))
            draw.text((x0 - 28, y - 7), f"{tick / 5:.1f}", fill=(0, 0, 0), font=font)
        bin_w = size / n_bins
        for b, (_, freq, n) in enumerate(_bins(confidence, hit, n_bins)):
            if n:
                x = x0 + b * bin_w
                bar_top = y0 + size - freq * size
                draw.rectangle([x + 1, bar_top, x + bin_w - 1, y0 + size], fill=(90, 120, 220))
                # adjacent bins' counts alternate between two heights: a bin is 16 px, a count up to 4 digits
                label_y = max(y0 + 1, bar_top - 13) - (12 if b % 2 else 0)
                draw.text((x + 1, label_y), str(n), fill=(200, 40, 40), font=font)
        draw.text((x0 + size // 2 - 40, y0 + size + 20), x_name, fill=(0, 0, 0), font=font)
        draw.text((x0 - 40, y0 - 16), y_name, fill=(90, 90, 90), font=font)
    return canvas


def line_plot(
    xs: Sequence[float], ys: Sequence[float], title: str, x_label: str, y_label: str, mark: float | None = None
) -> Image.Image:
    """A line plot with a log-scale x axis (e.g. loss against learning rate); ``mark``: a vertical
    line at that x (the suggestion). Drawn with PIL, as the other figures."""
    font = _font()
    width, height, left, top, bottom = 560, 360, 60, 30, 40
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    points = [(math.log10(x), y) for x, y in zip(xs, ys) if x > 0 and math.isfinite(y)]
    draw.text((left, 6), title, fill=(0, 0, 0), font=font)
    if len(points) < 2:
        return canvas
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = x1 if x1 > x0 else x0 + 1, y1 if y1 > y0 else y0 + 1
    plot_w, plot_h = width - left - 20, height - top - bottom

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * plot_w, top + (1 - (y - y0) / (y1 - y0)) * plot_h

    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=(0, 0, 0))
    draw.line([at(x, y) for x, y in points], fill=(40, 80, 200), width=2)
    for decade in range(math.ceil(x0), math.floor(x1) + 1):
        x, _ = at(decade, y0)
        draw.line([x, top + plot_h, x, top + plot_h + 4], fill=(0, 0, 0))
        draw.text((x - 12, top + plot_h + 6), f"1e{decade}", fill=(0, 0, 0), font=font)
    draw.text((4, top), f"{y1:.3g}", fill=(0, 0, 0), font=font)
    draw.text((4, top + plot_h - 12), f"{y0:.3g}", fill=(0, 0, 0), font=font)
    if mark is not None and mark > 0:
        x, _ = at(math.log10(mark), y0)
        draw.line([x, top, x, top + plot_h], fill=(220, 60, 60), width=1)
        draw.text((x + 4, top + 4), f"suggested {mark:.2g}", fill=(220, 60, 60), font=font)
    draw.text((left + plot_w // 2 - 60, height - 16), x_label, fill=(0, 0, 0), font=font)
    draw.text((left + 4, top + plot_h - 14), y_label, fill=(120, 120, 120), font=font)
    return canvas


def png_bytes(image: Image.Image) -> bytes:
    """A figure as PNG bytes, for the run folder's atomic writers."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def as_tensor(image: Image.Image) -> torch.Tensor:
    """A figure as the ``(3, H, W)`` uint8 tensor TensorBoard's ``add_image`` takes."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
