from __future__ import annotations

import pytest

import train
from pipeline.config import ConfigError, load_config


def _error_line(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        train.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


def test_overrides_and_presets_apply():
    cfg = load_config(["stage=features", "data.batch_size=7", "trainer.max_epochs=2", "model.backbone=resnet18"])
    assert cfg.data.batch_size == 7
    assert cfg.trainer.max_epochs == 2
    assert cfg.data.augment == "none"  # from configs/stage/features.yaml
    assert cfg.model.backbone == "resnet18"


def test_stage_presets_follow_the_seed():
    finetune = load_config(["stage=finetune"])
    assert finetune.optim.name == "rmsprop" and finetune.optim.lr == pytest.approx(1e-5)
    assert finetune.finetune.unfreeze_blocks == 1 and finetune.model.backbone == "vgg16"
    assert finetune.trainer.max_epochs - finetune.finetune.warmup_epochs == 100
    frozen = load_config(["stage=frozen"])
    assert frozen.optim.lr == pytest.approx(2e-5) and frozen.data.batch_size == 20
    assert frozen.data.image_size == 150 and frozen.trainer.max_epochs == 30


@pytest.mark.parametrize(
    "args, expected",
    [
        (["data.foo=1"], "unknown config key 'data.foo'; valid keys here: data.root"),
        (["bogus=1"], "unknown config key 'bogus'"),
        (["data.batch_size=abc"], "bad value for 'data.batch_size'"),
        (["model.pretrained=maybe"], "bad value for 'model.pretrained'"),
        (["stage=train"], "stage='train' is not valid; choose one of: features, frozen, finetune, test"),
        (["model.backbone=vgg19"], "choose one of: convnext_tiny, efficientnet_b0, efficientnet_lite0"),
        (["data.augment=heavy"], "data.augment='heavy' is not valid"),
        (["optim.name=lamb"], "optim.name='lamb' is not valid"),
        (["trainer.max_epoch=3"], "unknown trainer key(s) trainer.max_epoch"),
        (["optim.lr=0"], "optim.lr must be positive"),
        (["data.batch_size=-4"], "data.batch_size must be positive"),
        (["model.backbone=resnet18", "finetune.unfreeze_blocks=6"], "the backbone has 5"),
        (["stage=test"], "stage=test needs a checkpoint"),
        (["notakeyvalue"], "arguments must look like key=value"),
    ],
)
def test_bad_config_is_one_clear_line(capsys, args, expected):
    err = _error_line(capsys, args)
    assert err.startswith("error: ")
    assert expected in err


def test_missing_data_root_is_one_clear_line(capsys, tmp_path):
    err = _error_line(capsys, [f"data.root={tmp_path / 'nowhere'}", f"out_dir={tmp_path}", "data.source=none"])
    assert "does not exist" in err and "train,validation,test" in err


def test_help_lists_stages_backbones_and_keys(capsys):
    train.main(["--help"])
    out = capsys.readouterr().out
    for word in [
        "features",
        "frozen",
        "finetune",
        "test",
        "efficientnet_lite0",
        "vgg16",
        "data.root",
        "model.backbone",
        "finetune.unfreeze_blocks",
        "trainer.devices",
        "ckpt_path",
    ]:
        assert word in out


def test_config_error_is_raised_before_heavy_work():
    with pytest.raises(ConfigError):
        load_config(["model.backbone=nope"])
