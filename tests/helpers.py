"""Shared helpers: run train.py in-process, read run folders and TensorBoard event files."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import train


def run_train(args: list[str]) -> dict:
    metrics = train.main(args)
    assert metrics is not None
    return metrics


def run_dir(metrics: dict) -> Path:
    return Path(metrics["run_dir"])


def run_group(out: Path, stage: str, root: Path) -> Path:
    """The folder of a stage's runs on the suite's backbone: ``<out>/<stage>_<backbone>_<data folder>``."""
    from conftest import BACKBONE

    return Path(out) / f"{stage}_{BACKBONE}_{Path(root).name}"


def read_metrics(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def scalar_tags(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run folder as TensorBoard shows it (all event files, in order,
    with purged steps of restarted runs dropped): ``tag -> [(step, value), ...]``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensor_tags(path: Path) -> set[str]:
    """Tags of text / hparams summaries (stored as tensors or plugin data)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in sorted(path.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
        acc.Reload()
        tags |= set(acc.Tags()["tensors"])
        tags |= {f"plugin:{name}" for name in acc.PluginAssets("hparams") or []}
        for plugin in ("hparams", "text"):
            if acc.summary_metadata:
                tags |= {
                    f"plugin:{plugin}"
                    for meta in acc.summary_metadata.values()
                    if meta.plugin_data.plugin_name == plugin
                }
    return tags


def image_counts(path: Path) -> dict[str, int]:
    """Image tags of the run folder as TensorBoard shows them, with how many steps each has."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"images": 0})
    acc.Reload()
    return {tag: len(acc.Images(tag)) for tag in acc.Tags()["images"]}


def image_sizes(path: Path) -> dict[str, tuple[int, int]]:
    """The (width, height) of the last step of each image tag of the run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"images": 0})
    acc.Reload()
    return {tag: (acc.Images(tag)[-1].width, acc.Images(tag)[-1].height) for tag in acc.Tags()["images"]}


def sigterm_at_step(monkeypatch, step: int, signum: int | None = None) -> None:
    """The next training run in this process gets SIGTERM (or ``signum``) when it reaches global
    step ``step`` (``monkeypatch.undo()`` or the test's end removes it)."""
    import os
    import signal

    from lightning_modules.run_safety import StepSeed

    original = StepSeed.on_train_batch_start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == step:
            os.kill(os.getpid(), signum or signal.SIGTERM)
        return original(self, trainer, pl_module, batch, batch_idx)

    monkeypatch.setattr(StepSeed, "on_train_batch_start", on_train_batch_start)


def wait_for_file(path: Path, procs: Sequence[subprocess.Popen] = (), timeout: float = 300) -> None:
    """Until ``path`` exists; fails if ``timeout`` passes or one of ``procs`` ends first."""
    deadline = time.time() + timeout
    while not path.exists():
        ended = [p.args for p in procs if p.poll() is not None]
        assert not ended, f"ended before writing {path.name}: {ended}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def after_event_files(folder: Path) -> None:
    """Until the clock's second is past every TensorBoard event file's under ``folder``. Their names
    begin with the second they were created in, then the pid: a resume in the same second as the run it
    continues, from a process with a smaller pid, would sort before it, and TensorBoard would read the
    resumed steps first and drop the earlier ones as purged. A person never resumes that fast."""
    stamps = [int(f.name.split(".")[3]) for f in folder.rglob("events.out.tfevents.*")]
    while stamps and time.time() < max(stamps) + 1:
        time.sleep(0.05)


def release_together(go: Path, procs: Sequence[subprocess.Popen], timeout: float = 300) -> None:
    """Processes that write ``<go>.<pid>.ready`` and then wait for the file ``go`` (``kill_at.py``
    with ``START_AT=go``): once all are ready, release them at one instant."""
    for proc in procs:
        wait_for_file(Path(f"{go}.{proc.pid}.ready"), procs, timeout)
    go.touch()


def initial_state(args: list[str]) -> dict[str, torch.Tensor]:
    """The model exactly as a run with ``args`` starts it (same seed, same construction path)."""
    from lightning.pytorch import seed_everything

    from pipeline.config.load import load_config
    from pipeline.runner.build import build_model

    cfg = load_config(args)
    seed_everything(cfg.seed)
    return {k: v.clone() for k, v in build_model(cfg, ["cats", "dogs"]).state_dict().items()}


def block_of(key: str) -> int:
    """The block index of a ``backbone.blocks.<i>....`` state-dict key."""
    return int(key.split(".")[2])


def conv_weights(state: dict[str, torch.Tensor], block: int) -> list[str]:
    """The keys of backbone block ``block``'s convolution kernels (its 4-d weights)."""
    prefix = f"backbone.blocks.{block}."
    return [k for k, v in state.items() if k.startswith(prefix) and k.endswith("weight") and v.dim() == 4]


def assert_only_the_head_trains(args: list[str]) -> None:
    """Run ``args`` (a frozen-backbone stage): every backbone tensor ends as it started, every
    weight of the head changed."""
    before = initial_state(args)
    after = checkpoint_state(run_dir(run_train(args)) / "checkpoints" / "last.ckpt")
    backbone = [k for k in before if k.startswith("backbone.")]
    head = [k for k in before if k.startswith("head.") and k.endswith("weight")]
    assert backbone and head
    assert all(torch.equal(before[k], after[k]) for k in backbone), "a frozen backbone tensor changed"
    assert all(not torch.equal(before[k], after[k]) for k in head), "the head did not train"


def sigterm_then_resume(monkeypatch, capsys, args: list[str], step: int) -> tuple[int, dict]:
    """Run ``args`` in this process with SIGTERM at global step ``step`` (it must stop with 143 and
    say how to resume), then resume it with ``ckpt_path=last``: (the global step of the last.ckpt
    the interrupt wrote, the resumed run's metrics)."""
    import pytest

    sigterm_at_step(monkeypatch, step)
    with pytest.raises(SystemExit) as exc:
        train.main(args)
    assert exc.value.code == 143
    assert "resume with ckpt_path=last" in capsys.readouterr().err
    monkeypatch.undo()
    out = next(a.split("=", 1)[1] for a in args if a.startswith("out_dir="))
    last = next(Path(out).glob("*/*/checkpoints/last.ckpt"))
    return torch.load(last, weights_only=True)["global_step"], run_train([*args, "ckpt_path=last"])


def largest_weight_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two runs' final weights (their last.ckpt)."""
    x = checkpoint_state(run_dir(a) / "checkpoints" / "last.ckpt")
    y = checkpoint_state(run_dir(b) / "checkpoints" / "last.ckpt")
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def study_args(root: Path, out: Path, weights: list[str]) -> list[str]:
    """A toy study of four cells: two seeds of good weights, two of a broken weights file (failed rows)."""
    from conftest import fast_args

    args = fast_args(
        root,
        out,
        stage="features",
        **{"trainer.max_epochs": "2", "seeds": "[1,2]", "sweep.model.weights": "[" + ",".join(weights) + "]"},
    )
    return [a for a in args if not a.startswith("model.weights=")]


def comparable(summary: Path) -> str:
    """summary.md without what differs between two runs of a study: the command (its out_dir) and
    each run's wall time."""
    lines = summary.read_text().splitlines()[3:]
    return "\n".join(re.sub(r"\| [0-9.]+ \|$", "|", line) for line in lines)


def error_line(capsys, args: list[str]) -> str:
    """``train.py args`` must stop with exit code 2 and one line on stderr (no traceback): that line."""
    import pytest

    with pytest.raises(SystemExit) as exc:
        train.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err
