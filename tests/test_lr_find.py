"""stage=lr_find: the range test on the head phase, at most one epoch, a plot and a suggestion."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from PIL import Image

from conftest import BACKBONE, fast_args
from helpers import image_counts, run_train, scalar_tags


def test_lr_find_writes_a_plot_and_a_suggestion_inside_its_range(toy_root, tmp_path, capsys):
    args = fast_args(
        toy_root,
        tmp_path,
        stage="lr_find",
        **{"data.batch_size": "4", "lr_find.min_lr": "1e-5", "lr_find.max_lr": "1.0", "lr_find.num_steps": "500"},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_train(args)
    # the frozen backbone is in eval mode on purpose: Lightning's note about it is not shown
    assert not [w for w in caught if "eval mode" in str(w.message)], [str(w.message) for w in caught]
    folder = Path(result["run_dir"])
    assert folder.parent.name == f"lr_find_{BACKBONE}_{toy_root.name}"
    assert result["steps"] <= 12  # 48 training images / 4: one epoch, although 500 were asked for
    lrs = result["lr"]
    assert lrs == sorted(lrs) and 1e-5 <= lrs[0] < lrs[-1] <= 1.0
    assert result["suggested_lr"] is not None and 1e-5 <= result["suggested_lr"] <= 1.0
    assert f"suggested optim.lr={result['suggested_lr']:.3g}" in capsys.readouterr().out
    assert json.loads((folder / "lr_find.json").read_text())["suggested_lr"] == result["suggested_lr"]
    with Image.open(folder / "lr_find.png") as plot:
        assert plot.size == (560, 360)
    assert image_counts(folder)["lr_find/plot"] == 1
    assert len(scalar_tags(folder)["lr_find/loss"]) == result["steps"]
    # Lightning's temporary checkpoint went to the run folder and is gone: nothing left behind
    assert not list(Path.cwd().glob(".lr_find_*.ckpt")) and not list(folder.glob(".lr_find_*.ckpt"))
    # nothing was trained for real: no checkpoints
    assert not (folder / "checkpoints").exists() or not any((folder / "checkpoints").iterdir())
