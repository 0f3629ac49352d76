"""The notebook side of the Python API: figures of what training sees and where a model errs, and
run()'s console is train.py's."""

from __future__ import annotations

import warnings

import pytest

from pipeline import api

from conftest import BACKBONE, fast_args

pytest.importorskip("matplotlib", reason='pip install -e ".[notebook]"')

QUIET = "is smaller than the logging interval"  # Lightning's note on a short epoch, which train.py drops


def _kwargs(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in args if not a.startswith("stage="))


def test_the_api_drops_what_the_cli_drops_and_restores_the_filters(toy_root, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        api.run(
            "frozen",
            **_kwargs(
                fast_args(toy_root, tmp_path / "out", **{"trainer.max_epochs": "1", "trainer.log_every_n_steps": "50"})
            ),
        )
        shown = [str(w.message) for w in caught]
        assert not [m for m in shown if QUIET in m], shown
        warnings.warn(f"a loader {QUIET}", UserWarning, stacklevel=1)  # the caller's own filters are back
    assert any(QUIET in str(w.message) for w in caught)


def test_show_batch_draws_augmented_and_mixed_images(toy_root):
    from pipeline import show_batch

    common = {"data_root": toy_root, "data_source": "none", "model_backbone": BACKBONE, "data_image_size": 32}
    fig = show_batch(n=6, data_augment="randaugment", **common)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 6 and set(titles) <= {"cats", "dogs"}
    mixed = show_batch(n=8, data_mix="mixup", **common)
    assert any(" + " in ax.get_title() for ax in mixed.axes)


def test_top_losses_and_confusion_matrix(trained_ckpt, toy_root):
    from pipeline import confusion_matrix, load_model, top_losses
    from pipeline.notebook import split_predictions

    model = load_model(trained_ckpt)
    pred = split_predictions(model, toy_root / "validation")
    mistakes = int((pred.probs.argmax(1) != pred.targets).sum())
    fig = top_losses(model, toy_root / "validation", k=3)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == min(3, mistakes) and all(t.startswith("true ") and "\npred " in t for t in titles)
    where = f"16 images of {toy_root.name}/validation"  # the folder's last two parts, not its long path
    said = fig._suptitle.get_text() if mistakes else fig.texts[0].get_text()
    listed = f"{min(3, mistakes)} most confident of {mistakes} mistakes on {where}"
    assert said == (listed if mistakes else f"no mistakes on the {where}")
    matrix = confusion_matrix(model, toy_root / "validation")
    assert matrix.axes[0].get_title() == f"{toy_root.name}/validation: 16 images"
    texts = [t.get_text() for t in matrix.axes[0].texts]
    assert sum(int(t) for t in texts) == len(pred.files) == 16
