"""``stage=test``: a trained checkpoint evaluated on a test split (its own, or other photos with
the same classes), with the shift report; nothing trains."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from core.errors import IdentityError
from datamodules.data_index import SplitIndex, scan_splits
from datamodules.image_folder import default_num_workers
from datamodules.layout import split_spec
from datamodules.manifest import record_split
from pipeline.config.identity import check_identity, split_digest
from pipeline.config.load import cache_dir as cache_folder
from pipeline.robustness.shift_report import report_robustness
from pipeline.runner.build import evaluation_images, report_skipped
from pipeline.runner.checkpoints import checkpoint_for, model_from_checkpoint
from pipeline.runner.evaluation import summarise
from pipeline.runner.results import write_config, write_results
from pipeline.runner.run_dir import resolve_run
from pipeline.runner.trainer_factory import make_trainer


def run_test(cfg: DictConfig, run_name: str | None) -> dict[str, Any]:
    started = time.time()
    # A flat folder: the test split the checkpoint's run recorded, if it sits in its run folder.
    recorded = Path(cfg.ckpt_path).resolve().parent.parent / "manifest.csv"
    spec = split_spec(cfg.data, recorded if recorded.is_file() else None)
    index = scan_splits(
        cfg.data.root,
        ("test",),
        skip_bad_files=cfg.data.skip_bad_files,
        threads=cfg.data.num_workers or default_num_workers(),
        cache_dir=cache_folder(cfg),
        split=spec,
    )
    check_test_data(cfg, checkpoint_for(cfg.ckpt_path, cfg.model.backbone), index)
    run, _ = resolve_run(cfg, run_name)
    report_skipped(index, run)
    split = record_split(index, run.path, spec)
    model = model_from_checkpoint(cfg.ckpt_path)
    images = evaluation_images(cfg, model, index)
    write_config(cfg, run)
    trainer = make_trainer(cfg, run.path, [])
    test = summarise(trainer.test(model, datamodule=images, verbose=False), "test")  # the result block shows it
    extra = {"ckpt_path": cfg.ckpt_path, **({"split": split} if split else {})}
    extra |= report_robustness(cfg, trainer, model, index.samples["test"], run, (test or {}).get("acc"))
    return write_results(cfg, run, trainer, model, started, None, test, extra)


def check_test_data(cfg: DictConfig, ckpt: dict, index: SplitIndex) -> None:
    """The test folder against the checkpoint's recorded identity: the classes must be the same, in
    order; another folder is fine (said in one line); the training folder itself must give the test
    split recorded at training, or its figures could include images the model trained on."""
    recorded = ckpt.get("identity")
    if recorded is None:
        check_identity("stage=test", cfg.ckpt_path, None, {})  # raises: an older version's checkpoint
    if recorded["classes"] != index.classes:
        raise IdentityError(
            f"stage=test: checkpoint {cfg.ckpt_path} was trained on classes {recorded['classes']}, "
            f"the test folder has {index.classes} (names and order must match)"
        )
    now = split_digest(index.samples["test"], cfg.data.root)
    if str(Path(cfg.data.root).resolve()) != recorded["data.root"]:
        rank_zero_info(
            f"stage=test on {cfg.data.root}: not the folder this checkpoint was trained on ({recorded['data.root']}); "
            f"the classes are the same, so these are its figures on {now['files']} other photos"
        )
    elif now != recorded["split"].get("test"):
        raise IdentityError(
            f"stage=test: the test split of {cfg.data.root} is not the one recorded when checkpoint {cfg.ckpt_path} "
            f"was trained ({recorded['split'].get('test', {}).get('files')} -> {now['files']} files): it may hold "
            "images the model trained on; evaluate the run's own split (its manifest.csv) or another folder"
        )
