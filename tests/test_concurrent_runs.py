"""Four toy runs started at the same instant on one out_dir and one data.cache_dir: four run
folders, four correct metrics.json, each cache built once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import fast_args
from helpers import release_together
from toy_data import make_image_tree

KILL_AT = Path(__file__).resolve().parent / "kill_at.py"


@pytest.mark.slow  # four processes at once: about 16 s of the default suite's 4-minute budget
def test_four_runs_at_one_instant_share_nothing_but_the_caches(tmp_path):
    root = make_image_tree(tmp_path / "toy")
    out, cache = tmp_path / "out", tmp_path / "cache"
    common = {"trainer.max_epochs": "1", "data.cache_dir": str(cache)}
    features = fast_args(root, out, stage="features", **common)
    frozen = fast_args(root, out, stage="frozen", **common, **{"data.decoded_cache": "true"})
    env = {k: v for k, v in os.environ.items() if k != "TRANSFER_RUN_DIR"}
    go = tmp_path / "go"  # every process has imported torch and is waiting for it
    procs = [
        subprocess.Popen(
            [sys.executable, str(KILL_AT), "none", str(go), *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for args in (features, features, frozen, frozen)
    ]
    release_together(go, procs)
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [log[-2000:] for log in logs]

    folders = sorted(p.parent for p in out.glob("*/*/metrics.json"))
    assert len(folders) == 4 and len({f.name for f in folders if "features" in str(f)}) == 2
    metrics = [json.loads((f / "metrics.json").read_text()) for f in folders]
    by_stage: dict[str, list[dict]] = {}
    for m in metrics:
        by_stage.setdefault(m["stage"], []).append(m)
    for stage, pair in by_stage.items():
        assert len(pair) == 2
        assert pair[0]["val"] == pair[1]["val"] and pair[0]["test"] == pair[1]["test"], stage  # same seed, same data
        assert pair[0]["test"]["count"] == 16
    assert sorted(m["feature_cache"]["built"] for m in by_stage["features"]) == [False, True]
    text = "\n".join(logs)
    assert text.count("decoded-image cache: ") == 1, text.count("decoded-image cache: ")  # one build
    assert len(list(cache.glob("*.pt"))) == 1 and len(list(cache.glob("*.u8"))) == 1
    assert not list(cache.glob(".*.tmp")) and not list(out.rglob(".*.tmp"))
