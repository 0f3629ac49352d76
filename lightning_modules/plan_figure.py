"""``plan.png``: a stage's plan as a picture, computed from the ``Plan`` itself.

One line per optimizer group (the head, then each block the plan trains) with its learning rate
over the stage's epochs, drawn only while that group trains; the background of each phase is
shaded darker the more backbone blocks it trains. ``plan_curves`` is what is drawn, so a test
can compare the plotted points with ``Plan.lr``.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from core.words import count
from lightning_modules.figures import _font
from lightning_modules.schedule import Phase, Plan

COLOURS = [(220, 60, 60), (40, 80, 200), (40, 150, 70), (200, 130, 20), (140, 60, 170), (20, 150, 160)]


def trains(plan: Plan, group: str, phase: Phase) -> bool:
    """Whether optimizer ``group`` trains during ``phase`` (the head always does)."""
    if group == "head":
        return True
    return int(group.removeprefix("block")) in phase.trained(plan.n_blocks)


def plan_curves(plan: Plan, points_per_epoch: int = 20) -> dict[str, list[tuple[float, float | None]]]:
    """``{group: [(epoch, lr or None while frozen), ...]}`` at ``points_per_epoch`` points per epoch."""
    times = [i / points_per_epoch for i in range(plan.epochs * points_per_epoch + 1)]
    curves: dict[str, list[tuple[float, float | None]]] = {}
    for group, peak in plan.groups:
        points = []
        for t in times:
            phase = plan.phases[plan.phase_index(min(int(t), plan.epochs - 1))]
            points.append((t, peak * plan.factor(t) if trains(plan, group, phase) else None))
        curves[group] = points
    return curves


def plan_figure(plan: Plan, width: int = 720, height: int = 360) -> Image.Image:
    """The plan drawn with PIL, as the project's other figures (epochs by learning rate, log scale)."""
    font = _font()
    left, right, top, bottom = 70, 150, 34, 40
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    plot_w, plot_h = width - left - right, height - top - bottom
    curves = plan_curves(plan)
    # log scale: the backbone's rates are often a twentieth of the head's; rates under the floor
    # (the start of a warm-up, the end of an annealing) are drawn at the floor
    high = math.log10(max(lr for _, lr in plan.groups) * 1.5)
    low = math.log10(min(lr for _, lr in plan.groups) / 30)

    def at(t: float, lr: float) -> tuple[float, float]:
        y = (min(max(math.log10(lr), low), high) - low) / (high - low) if lr > 0 else 0.0
        return left + t / plan.epochs * plot_w, top + (1 - y) * plot_h

    for index, phase in enumerate(plan.phases):
        shade = 245 - int(70 * phase.top_blocks / max(plan.n_blocks, 1))
        x0, x1 = at(phase.start, 0)[0], at(phase.end, 0)[0]
        draw.rectangle([x0, top, x1, top + plot_h], fill=(shade, shade, 255))
        label = "head only" if phase.top_blocks == 0 else f"top {phase.top_blocks} blocks"
        if phase.blocks is not None:
            label = f"blocks {', '.join(map(str, phase.blocks))}"
        draw.text((x0 + 4, top + 4), f"phase {index}: {label}"[: max(4, int((x1 - x0) / 7))], fill=(0, 0, 0), font=font)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=(0, 0, 0))
    for k, (group, points) in enumerate(curves.items()):
        colour = COLOURS[k % len(COLOURS)]
        segment: list[tuple[float, float]] = []
        for t, lr in [*points, (None, None)]:
            if lr is None:
                if len(segment) > 1:
                    draw.line(segment, fill=colour, width=2)
                segment = []
            else:
                segment.append(at(t, lr))
        draw.text(
            (left + plot_w + 8, top + 16 * k), f"{group} (peak {dict(plan.groups)[group]:.2g})", fill=colour, font=font
        )
    title = f"plan for stage={plan.stage}: {count(plan.epochs, 'epoch')}, scheduler {plan.scheduler}"
    draw.text((left, 8), title, fill=(0, 0, 0), font=font)
    for decade in range(math.ceil(low), math.floor(high) + 1):
        y = at(0, 10.0**decade)[1]
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        draw.text((8, y - 6), f"1e{decade}", fill=(0, 0, 0), font=font)
    for epoch in sorted({0, plan.epochs, *(p.start for p in plan.phases)}):
        x, _ = at(epoch, 0)
        draw.line([x, top + plot_h, x, top + plot_h + 4], fill=(0, 0, 0))
        draw.text((x - 6, top + plot_h + 6), str(epoch), fill=(0, 0, 0), font=font)
    draw.text((left + plot_w // 2 - 50, height - 16), "epoch (learning rate, log scale)", fill=(0, 0, 0), font=font)
    return canvas
