"""The benchmark scripts' arithmetic, on a fake clock."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import ROOT


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scan_scaling_times_and_speedups():
    scan = _load("scan_scaling")
    ticks = iter([10.0, 12.5])
    assert scan.timed(lambda: None, clock=lambda: next(ticks)) == 2.5
    assert scan.speedup(30.0, 0.5) == 60.0
    row = {"files": 4000, "first_s": 4.0, "rescan_s": 0.1, "peak_rss_mb": 200.0}
    line = scan.table([row]).splitlines()[-1]
    assert line == "| 4,000 | 4.00 | 1.000 | 0.100 | 40x | 200 | 50.00 |"


def test_scan_scaling_generates_the_layout(tmp_path: Path):
    scan = _load("scan_scaling")
    scan.make_jpegs(tmp_path, 40)
    counts = {split: len(list((tmp_path / split).rglob("*.jpg"))) for split in scan.SPLITS}
    assert counts == {"train": 20, "validation": 10, "test": 10}


def test_seed_protocol_divides_n_batches_by_their_own_time():
    seed = _load("seed_protocol")
    # warm-up ends at t=1; three timed batches of 4 images end at t=2, 3, 5: 12 images in 4 s
    assert seed.images_per_second([1.0, 2.0, 3.0, 5.0], [4, 4, 4]) == 3.0
    # 100 batches of 8 images, one per second after the warm-up: 8 img/s (n / (n + 1) of it before)
    assert seed.images_per_second([float(t) for t in range(101)], [8] * 100) == 8.0
    assert seed.median([3.0, 1.0, 2.0]) == 2.0
    with pytest.raises(ValueError):
        seed.images_per_second([1.0, 2.0], [4, 4])


def test_gpu_check_reports_a_failing_configuration_and_goes_on(monkeypatch):
    """A compile error or out-of-memory in one configuration is a row, not the end of the check."""
    import torch

    gpu = _load("gpu_check")
    import steps  # gpu_check put benchmarks/ on the path

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 2**21)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(steps, "build", lambda backbone, size, channels_last: (None, None, None))

    def make_step(model, plan, cfg, method, batch, device, precision):
        if method == steps.METHODS[1] and precision == "bf16":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return method

    monkeypatch.setattr(steps, "make_step", make_step)
    monkeypatch.setattr(steps, "images_per_second", lambda step, device, warmup, seconds: 100.0)
    variants = (("fp32", False, False), ("bf16", True, False))
    rows = gpu.speed_rows(torch.device("cpu"), 0.1, variants)
    assert len(rows) == len(gpu.MODELS) * len(variants) * len(steps.METHODS)  # every configuration ran
    failed = [r for r in rows if "error" in r]
    assert [(r["method"], r["precision"]) for r in failed] == [(steps.METHODS[1], "bf16")] * len(gpu.MODELS)
    assert failed[0]["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert all(r["images_per_s"] == 100.0 and r["peak_mb"] == 2.0 for r in rows if "error" not in r)


def test_finetune_methods_reads_time_logs_and_pairs_shifted_copies(tmp_path: Path):
    methods = _load("finetune_methods")
    log = tmp_path / "time.log"
    log.write_text(
        "\tUser time (seconds): 100.5\n\tSystem time (seconds): 19.5\n"
        "\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:03.5\n\tMaximum resident set size (kbytes): 2048000\n"
    )
    assert methods.time_log(log) == {"cpu_s": 120.0, "wall_s": 3723.5, "peak_mb": 2000.0}
    (tmp_path / "shift_predictions.csv").write_text(
        "file,target,blur-1,blur-2\na.jpg,cat,cat,dog\nb.jpg,dog,dog,dog\nc.jpg,cat,,\n"
    )  # c.jpg unreadable: left out, not counted wrong
    assert methods.shifted_correct(tmp_path) == {
        "a.jpg|blur-1": True, "a.jpg|blur-2": False, "b.jpg|blur-1": True, "b.jpg|blur-2": True
    }  # fmt: skip
