"""The staged schedule of a stage, as one plain value: which blocks train when, at which rate.

Everything a stage does over time is decided here, before any Trainer exists; the rest of the
code only executes a :class:`Plan` (``pipeline.runner.phases`` runs one fit per phase, the
``ApplyPlan`` callback sets each phase's trainable blocks and, before every step, every optimizer
group's rate to :meth:`Plan.lr` at the global step). The whole
``stage=finetune`` schedule, fastai's ``fine_tune`` in spirit, is :func:`build_plan`:

* head warm-up with the backbone frozen, then the top blocks unfrozen (one step, or gradual
  ``milestones`` as Lightning Flash's ``unfreeze_milestones``);
* discriminative rates: the ``k``-th trained block from the top trains at
  ``lr * backbone_lr_ratio * layer_decay**k`` (timm's layer decay, fastai's ``slice``), one
  optimizer group per block; surgical fine-tuning (``finetune.blocks``) trains any set of blocks;
* one rate multiplier for all groups, a pure function of the position in the stage.

Learning rate granularity: per optimizer step. Step ``s`` uses the plan's rate at the middle of
its interval, ``t = (s + 0.5) / steps_per_epoch`` epochs, so warm-ups and one-cycle phases of one
or two epochs are smooth, no step runs at rate 0, and a resume at any step (mid-epoch included)
gets exactly the rate an uninterrupted run had.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from core.errors import UserError
from core.words import count, epoch_range

# One-cycle constants as in fastai's fit_one_cycle: start at lr/25, end at lr/1e5, 25% warm-up.
ONECYCLE_DIV, ONECYCLE_FINAL_DIV, ONECYCLE_PCT = 25.0, 1e5, 0.25


class PlanError(UserError, ValueError):
    """A schedule that cannot run as asked (e.g. blocks that would never unfreeze); one line."""


@dataclass(frozen=True)
class Phase:
    """Epochs ``[start, end)`` during which ``top_blocks`` backbone blocks train: the top ones, or
    those of ``blocks`` (surgical fine-tuning, e.g. only block 0)."""

    start: int
    end: int
    top_blocks: int  # how many blocks train
    blocks: tuple[int, ...] | None = None  # which, when not the top ``top_blocks``

    @property
    def epochs(self) -> int:
        return self.end - self.start

    def trained(self, n_blocks: int) -> tuple[int, ...]:
        """The indices of the blocks that train, bottom to top."""
        return self.blocks if self.blocks is not None else top_blocks(n_blocks, self.top_blocks)

    def describe(self, n_blocks: int) -> str:
        if self.top_blocks == 0:
            return "backbone frozen"
        if self.blocks is None:
            return f"top {self.top_blocks} of {n_blocks} blocks train"
        return f"block{'s' if len(self.blocks) > 1 else ''} {', '.join(map(str, self.blocks))} of {n_blocks} train"


def top_blocks(n_blocks: int, count: int) -> tuple[int, ...]:
    """The indices of the top ``count`` of ``n_blocks`` blocks."""
    return tuple(range(n_blocks - count, n_blocks))


def parse_blocks(value: Any, n_blocks: int) -> tuple[int, ...]:
    """``finetune.blocks``: ``top:K``, ``bottom:K`` or a list of block indices (0 = the stem), as
    sorted indices; PlanError (one line) for anything else."""
    how, _, count = str(value).partition(":")
    if isinstance(value, str) and how in ("top", "bottom") and count.isdigit() and 0 < int(count) <= n_blocks:
        k = int(count)
        return top_blocks(n_blocks, k) if how == "top" else tuple(range(k))
    listed = list(value) if isinstance(value, (list, tuple)) else None
    if listed and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_blocks for i in listed):
        return tuple(sorted(set(listed)))
    raise PlanError(
        f"finetune.blocks={value} is not valid; give top:K or bottom:K (K in 1..{n_blocks}) or a list of "
        f"block indices in 0..{n_blocks - 1}, e.g. [0,3] (the backbone has {n_blocks} blocks, 0 = the stem)"
    )


@dataclass(frozen=True)
class Plan:
    stage: str
    phases: tuple[Phase, ...]
    n_blocks: int  # blocks of the backbone
    groups: tuple[tuple[str, float], ...]  # (optimizer group, peak learning rate): head, then top-down blocks
    scheduler: str = "none"
    lr_warmup_epochs: float = 0.0
    early_stops: tuple[tuple[int, int], ...] = field(default=())  # (phase, epochs it trained), in order

    # --- reading ------------------------------------------------------------------------------
    @property
    def epochs(self) -> int:
        return self.phases[-1].end

    def phase_index(self, epoch: int) -> int:
        for index, phase in enumerate(self.phases):
            if phase.start <= epoch < phase.end:
                return index
        raise PlanError(f"epoch {epoch} is outside the plan's {self.epochs} epochs")

    def peak_lr(self, group: str) -> float:
        return dict(self.groups)[group]

    def block_group(self, block: int) -> str | None:
        """The optimizer group of backbone block ``block`` (None: the plan never trains it)."""
        name = f"block{block}"
        return name if name in dict(self.groups) else None

    def factor(self, t: float) -> float:
        """Multiplier of every group's peak rate at ``t`` epochs into the stage (fractions allowed)."""
        t = min(max(t, 0.0), float(self.epochs))
        warmup = self.lr_warmup_epochs
        if self.scheduler == "onecycle":
            phase = self.phases[self.phase_index(min(int(t), self.epochs - 1))]
            u = (t - phase.start) / phase.epochs  # position inside the phase, 0..1
            pct = warmup / phase.epochs if warmup > 0 else ONECYCLE_PCT
            low, final = 1 / ONECYCLE_DIV, 1 / ONECYCLE_FINAL_DIV
            if u < pct:
                return low + (1 - low) * (1 - math.cos(math.pi * u / pct)) / 2
            return final + (1 - final) * (1 + math.cos(math.pi * (u - pct) / (1 - pct))) / 2
        if t < warmup:  # linear warm-up from the stage's start (none, cosine)
            return t / warmup
        if self.scheduler == "cosine":  # one annealing over the whole stage, across phases
            return (1 + math.cos(math.pi * (t - warmup) / (self.epochs - warmup))) / 2
        return 1.0

    def lr(self, group: str, step: int, steps_per_epoch: int) -> float:
        """The rate of ``group`` during global optimizer step ``step``."""
        return self.peak_lr(group) * self.factor(step_position(step, steps_per_epoch))

    # --- changing -----------------------------------------------------------------------------
    def stop_early(self, index: int, end_epoch: int) -> Plan:
        """This plan after phase ``index`` stopped early at ``end_epoch`` (its patience ran out,
        possibly on its last epoch): later phases move up, so the next phase starts right away
        (and the stage gets shorter by the epochs skipped)."""
        phase = self.phases[index]
        if not phase.start < end_epoch <= phase.end:
            return self
        shift = phase.end - end_epoch
        phases = [
            *self.phases[:index],
            replace(phase, end=end_epoch),
            *(replace(p, start=p.start - shift, end=p.end - shift) for p in self.phases[index + 1 :]),
        ]
        return replace(self, phases=tuple(phases), early_stops=(*self.early_stops, (index, end_epoch - phase.start)))

    def replay(self, early_stops: list[list[int]] | tuple) -> Plan:
        """Apply a resumed run's recorded early stops to this (freshly built) plan."""
        plan = self
        for index, trained in early_stops:
            if 0 <= index < len(plan.phases):  # a stop of a phase this plan does not have is moot
                plan = plan.stop_early(index, plan.phases[index].start + trained)
        return plan

    # --- showing ------------------------------------------------------------------------------
    def phase_text(self, index: int) -> str:
        phase = self.phases[index]
        return f"phase {index}: {epoch_range(phase.start, phase.end)}: {phase.describe(self.n_blocks)}"

    def describe(self) -> str:
        lines = [
            f"plan for stage={self.stage}: {count(self.epochs, 'epoch')}, scheduler {self.scheduler}"
            + (f", {count(self.lr_warmup_epochs, 'warm-up epoch')}" if self.lr_warmup_epochs else "")
        ]
        for index in range(len(self.phases)):
            stop = [n for i, n in self.early_stops if i == index]
            note = f" (stopped early after {count(stop[0], 'epoch')})" if stop else ""
            lines.append(f"  {self.phase_text(index)}{note}")
        rates = ", ".join(f"{name} {lr:.3g}" for name, lr in self.groups)
        lines.append(f"  peak learning rates: {rates}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (safe in a ``weights_only`` checkpoint and in YAML)."""
        d = asdict(self)
        d["phases"] = [
            [p.start, p.end, p.top_blocks, *([list(p.blocks)] if p.blocks is not None else [])] for p in self.phases
        ]
        d["groups"] = [[name, lr] for name, lr in self.groups]
        d["early_stops"] = [list(s) for s in self.early_stops]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        return cls(
            stage=d["stage"],
            phases=tuple(Phase(*p[:3], tuple(p[3]) if len(p) > 3 else None) for p in d["phases"]),
            n_blocks=d["n_blocks"],
            groups=tuple((name, float(lr)) for name, lr in d["groups"]),
            scheduler=d["scheduler"],
            lr_warmup_epochs=float(d["lr_warmup_epochs"]),
            early_stops=tuple(tuple(s) for s in d["early_stops"]),
        )


def step_position(step: int, steps_per_epoch: int) -> float:
    """Epochs into the stage at the middle of optimizer step ``step``."""
    return (step + 0.5) / steps_per_epoch


def milestones_from(warmup_epochs: int, unfreeze_blocks: int, milestones: list | None) -> list[tuple[int, int]]:
    """``finetune.milestones`` as ``[(epoch, top_blocks), ...]``, or the one-step shorthand
    ``finetune.warmup_epochs`` / ``finetune.unfreeze_blocks``; always starting at epoch 0."""
    if milestones:
        pairs = [(int(e), int(b)) for e, b in milestones]
    else:
        pairs = [(warmup_epochs, unfreeze_blocks)]
    if pairs[0][0] > 0:
        pairs.insert(0, (0, 0))  # before the first milestone the backbone is frozen
    return pairs


def build_plan(
    stage: str,
    epochs: int,
    n_blocks: int,
    lr: float,
    *,
    milestones: list[tuple[int, int]] | None = None,
    backbone_lr_ratio: float = 1.0,
    layer_decay: float = 1.0,
    scheduler: str = "none",
    lr_warmup_epochs: float = 0.0,
    blocks: tuple[int, ...] | None = None,
) -> Plan:
    """The plan of ``stage`` (its name labels the plan); refuses (PlanError) any schedule that would
    not do what it says. ``milestones``: when the backbone's blocks unfreeze (None: never, as in
    the features and frozen stages); ``blocks``: the blocks that train once unfrozen, when not the
    top ones (one-step schedule only)."""
    if milestones is not None:
        pairs = milestones or [(0, 0)]
        if blocks == top_blocks(n_blocks, len(blocks or ())):
            blocks = None  # the top K: the same plan as finetune.unfreeze_blocks=K
        if blocks is not None and any(b not in (0, len(blocks)) for _, b in pairs):
            raise PlanError("finetune.blocks goes with finetune.warmup_epochs, not with finetune.milestones")
        _check_milestones(pairs, epochs, n_blocks)
        ends = [e for e, _ in pairs[1:]] + [epochs]
        phases = tuple(Phase(e, end, b, blocks if b else None) for (e, b), end in zip(pairs, ends))
    else:  # features, frozen: the backbone never trains
        phases = (Phase(0, epochs, 0),)
    # layer decay over the blocks that ever train: the k-th from the top of them at lr * ratio * decay**k
    trained = sorted({i for p in phases for i in p.trained(n_blocks)}, reverse=True)
    groups = [("head", lr)] + [(f"block{i}", lr * backbone_lr_ratio * layer_decay**k) for k, i in enumerate(trained)]
    _check_rates(scheduler, lr_warmup_epochs, phases, epochs, layer_decay, backbone_lr_ratio, len(trained))
    return Plan(stage, phases, n_blocks, tuple(groups), scheduler, float(lr_warmup_epochs))


def _check_milestones(pairs: list[tuple[int, int]], epochs: int, n_blocks: int) -> None:
    shown = [list(p) for p in pairs]
    for (e0, b0), (e1, b1) in zip(pairs, pairs[1:]):
        if e1 <= e0:
            raise PlanError(f"finetune.milestones must have increasing epochs, got {shown}")
        if b1 < b0:
            raise PlanError(f"finetune.milestones must not freeze blocks again (top blocks {b0} -> {b1}), got {shown}")
    for epoch, blocks in pairs:
        if epoch >= epochs:
            raise PlanError(
                f"an unfreeze at epoch {epoch} never happens with trainer.max_epochs={epochs} "
                f"(finetune.warmup_epochs / finetune.milestones must be below it)"
            )
        if not 0 <= blocks <= n_blocks:
            raise PlanError(f"cannot train the top {blocks} blocks: the backbone has {n_blocks} (milestones {shown})")
    if pairs[-1][1] == 0:
        raise PlanError(
            "stage=finetune never unfreezes a block (finetune.unfreeze_blocks=0 or milestones of 0 blocks); "
            "use stage=frozen to train the head only"
        )


def _check_rates(scheduler, warmup, phases, epochs, layer_decay, ratio, top_max) -> None:
    if scheduler == "onecycle":
        shortest = min(p.epochs for p in phases)
        if warmup >= shortest:
            raise PlanError(
                f"optim.lr_warmup_epochs={warmup:g} must be shorter than every phase of a one-cycle plan "
                f"(the shortest has {count(shortest, 'epoch')})"
            )
    elif warmup >= epochs:
        raise PlanError(f"optim.lr_warmup_epochs={warmup:g} must be shorter than trainer.max_epochs={epochs}")
    if top_max and ratio <= 0:
        raise PlanError(f"finetune.backbone_lr_ratio must be positive when blocks train, got {ratio}")


def param_groups(
    head: nn.Module,
    blocks: nn.ModuleList,
    plan: Plan,
    weight_decay: float,
    decay_norm_and_bias: bool = False,
    backbone_decay: bool = True,
) -> list[dict[str, Any]]:
    """Optimizer groups: the head, then every block the plan ever trains (all present from the
    start, so an unfreeze never adds a group), each at its peak rate. Norm weights and biases
    (every tensor of one dimension) get no weight decay unless ``decay_norm_and_bias``, as
    timm's ``param_groups_weight_decay``; such twins share the group's name and rate. Without
    ``backbone_decay`` (L2-SP) the blocks get none at all."""
    modules = [("head", head)] + [(plan.block_group(i), b) for i, b in enumerate(blocks) if plan.block_group(i)]
    groups = []
    for name, module in modules:
        decay, no_decay = [], []
        for param in module.parameters():
            (no_decay if param.ndim <= 1 and not decay_norm_and_bias else decay).append(param)
        decay_here = weight_decay if name == "head" or backbone_decay else 0.0
        for params, wd in ((decay, decay_here), (no_decay, 0.0)):
            if params:
                groups.append({"name": name, "params": params, "lr": plan.peak_lr(name), "weight_decay": wd})
    return groups
