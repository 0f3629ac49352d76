"""The shift report's views: the markdown tables, the bar chart and the TensorBoard scalars."""

from __future__ import annotations

import csv
import io
from typing import Any

from PIL import Image, ImageDraw

from lightning_modules.figures import _font, as_tensor
from pipeline.inference import CLEAN, Predictions, variant_label


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(interval: list[float] | None) -> str:
    return "n/a" if interval is None else f"{interval[0]:.4f}-{interval[1]:.4f}"


def _rows_table(first: str, rows: list[tuple[str, str, str, dict[str, Any]]]) -> list[str]:
    head = f"| {first} | severity | setting | accuracy | 95% interval | ECE | drop | correct / count |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, sev, setting, m in rows:
        numbers = [_num(m.get("acc")), _ci(m.get("acc_ci95")), _num(m.get("ece")), _num(m.get("drop"))]
        cells = [name, sev, setting, *numbers]
        cells.append(f"{m['correct']} / {m['count']}" if "count" in m else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def shift_table(report: dict[str, Any]) -> str:
    """``shift.md``: one row per shift and severity, the clean accuracy and the means."""
    clean = report["clean"]
    rows = [(CLEAN, "", f"({clean['source']})", clean)]
    rows += [(m["shift"], str(m["severity"]), m["setting"], m) for m in report["shifts"].values()]
    mean = {"acc": report["shift_acc"], "ece": report["shift_ece"], "drop": report["mean_drop"]}
    rows.append(("**mean (shift accuracy)**", "", "", mean))
    intro = (
        f"# Shift report\n\nTest split, {report['images']} images ({report['unreadable']} unreadable left out), "
        f"each shift applied to the decoded image before the evaluation transform; shift seed {report['seed']}, "
        f"temperature {report['temperature']:.3g}. Drop: clean accuracy minus the shifted one.\n"
    )
    return intro + "\n" + "\n".join(_rows_table("shift", rows)) + "\n"


def shift_chart(report: dict[str, Any]) -> Image.Image:
    """Horizontal bars of the accuracy under each shift with its 95% interval; the clean accuracy is
    the red line. Drawn with PIL, as the project's other figures."""
    font = _font()
    rows = list(report["shifts"].items())
    left, right, top, row_h = 250, 30, 40, 20
    width, height = 720, top + row_h * len(rows) + 40
    plot_w = width - left - right
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    title = f"test accuracy under input shifts (shift accuracy {_num(report['shift_acc'], 3)})"
    draw.text((10, 8), title, fill=(0, 0, 0), font=font)

    def x(value: float) -> float:
        return left + max(0.0, min(1.0, value)) * plot_w

    bottom = top + row_h * len(rows)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.line([x(tick), top - 4, x(tick), bottom], fill=(225, 225, 225))
        draw.text((x(tick) - 10, bottom + 4), f"{tick:.2f}", fill=(0, 0, 0), font=font)
    for i, (name, m) in enumerate(rows):
        y = top + i * row_h
        draw.text((6, y + 3), f"{name}: {m['setting']}"[:40], fill=(0, 0, 0), font=font)
        if m["acc"] is None:
            continue
        draw.rectangle([left, y + 3, x(m["acc"]), y + row_h - 3], fill=(90, 120, 220))
        low, high = m["acc_ci95"]
        mid = y + row_h // 2
        draw.line([x(low), mid, x(high), mid], fill=(0, 0, 0), width=1)
        for end in (low, high):
            draw.line([x(end), mid - 3, x(end), mid + 3], fill=(0, 0, 0), width=1)
    clean = report["clean"]["acc"]
    if clean is not None:
        draw.line([x(clean), top - 6, x(clean), bottom], fill=(220, 60, 60), width=2)
        label = f"clean {clean:.3f}"
        at = x(clean) + 3 if x(clean) < width - 90 else x(clean) - draw.textlength(label, font=font) - 3
        draw.text((at, top - 18), label, fill=(220, 60, 60), font=font)
    return canvas


def log_shift_report(writer, report: dict[str, Any], step: int = 0) -> None:
    """TensorBoard (a ``SummaryWriter`` or None): ``shift/<shift>-<severity>`` accuracies, the means
    and the chart."""
    if writer is None:
        return
    for name, m in report["shifts"].items():
        if m["acc"] is not None:
            writer.add_scalar(f"shift/{name}", m["acc"], step)
    for key in ("shift_acc", "shift_ece", "mean_drop"):
        if report[key] is not None:
            writer.add_scalar(f"shift/{key}", report[key], step)
    writer.add_image("shift/chart", as_tensor(shift_chart(report)), step)


def predictions_csv(rows: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


def shift_rows(samples, class_names, pred: Predictions, binary: bool) -> list[list[str]]:
    """``shift_predictions.csv``: each image's predicted class under each copy (empty: unreadable)."""
    predicted = pred.predicted(binary)
    rows = [["file", "target", *[variant_label(v) for v in pred.variants]]]
    for i, (path, label) in enumerate(samples):
        cells = [class_names[int(p)] for p in predicted[:, i]] if pred.readable[i] else [""] * len(pred.variants)
        rows.append([path, class_names[label], *cells])
    return rows


def extra_tests_table(report: dict[str, Any]) -> str:
    rows = [(name, "", m["path"], m) for name, m in report["tests"].items()]
    intro = "# Extra test folders\n\nEach folder evaluated clean, as the test split."
    intro += " Drop: test accuracy minus the folder's.\n"
    return intro + "\n" + "\n".join(_rows_table("folder", rows)) + "\n"
