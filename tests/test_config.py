from __future__ import annotations

import pytest

import train
from core.errors import ConfigError
from pipeline.config.load import load_config

from helpers import error_line


def test_overrides_and_presets_apply():
    cfg = load_config(["stage=features", "data.batch_size=7", "trainer.max_epochs=2", "model.backbone=resnet18"])
    assert cfg.data.batch_size == 7
    assert cfg.trainer.max_epochs == 2
    assert cfg.data.augment == "none"  # from configs/stage/features.yaml
    assert cfg.model.backbone == "resnet18"


def test_stage_presets_follow_the_seed():
    """The seed's VGG16 runs exactly the seed's presets; the default backbone is one that works offline."""
    assert load_config(["stage=finetune"]).model.backbone == "efficientnet_lite0"
    finetune = load_config(["stage=finetune", "model.backbone=vgg16"])
    assert finetune.optim.name == "rmsprop" and finetune.optim.lr == pytest.approx(1e-5)
    assert finetune.finetune.unfreeze_blocks == 1 and finetune.model.backbone == "vgg16"
    assert finetune.trainer.max_epochs - finetune.finetune.warmup_epochs == 100
    frozen = load_config(["stage=frozen", "model.backbone=vgg16"])
    assert frozen.optim.lr == pytest.approx(2e-5) and frozen.data.batch_size == 20
    assert frozen.data.image_size == 150 and frozen.trainer.max_epochs == 30


@pytest.mark.parametrize(
    "args, expected",
    [
        (["data.foo=1"], "unknown config key 'data.foo'; valid keys here: data.root"),
        (["bogus=1"], "unknown config key 'bogus'"),
        (["data.batch_size=abc"], "bad value for 'data.batch_size'"),
        (["model.pretrained=maybe"], "bad value for 'model.pretrained'"),
        (["stage=train"], "stage='train' is not valid; choose one of: features, frozen, finetune, linear_probe, test"),
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
    err = error_line(capsys, args)
    assert err.startswith("error: ")
    assert expected in err


def test_missing_data_root_is_one_clear_line(capsys, tmp_path):
    err = error_line(capsys, [f"data.root={tmp_path / 'nowhere'}", f"out_dir={tmp_path}", "data.source=none"])
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


def test_schema_rows_list_every_key_with_its_facts():
    from omegaconf import OmegaConf

    from pipeline.config.load import RunConfig, flatten_keys, schema_rows

    rows = {row.key: row for row in schema_rows()}
    assert set(rows) == set(flatten_keys(OmegaConf.to_container(OmegaConf.structured(RunConfig))))
    assert rows["data.augment"].choices[:4] == ("none", "seed", "standard", "robust")
    assert rows["data.mix"].choices == ("none", "mixup", "cutmix") and rows["data.random_erasing"].range == "[0, 1]"
    assert rows["optim.label_smoothing"].range == "[0, 1)" and rows["optim.lr"].default == pytest.approx(2e-5)
    assert rows["data.num_workers"].type == "int | None" and "timm:<name>" in rows["model.backbone"].other


def test_choice_names_are_the_implementing_registries():
    from datamodules.choices import SHIFT_NAMES, SOURCE_NAMES
    from datamodules.download import SOURCES
    from datamodules.shifts import SHIFTS
    from lightning_modules.backbones import BACKBONES
    from lightning_modules.choices import BACKBONE_NAMES, OPTIMIZERS, POOLS
    from lightning_modules.classifier import OPTIMIZER_TYPES
    from lightning_modules.heads import POOLING

    assert BACKBONE_NAMES == tuple(BACKBONES)
    assert SHIFT_NAMES == tuple(SHIFTS)
    assert SOURCE_NAMES == (*SOURCES, "none")
    assert OPTIMIZERS == tuple(OPTIMIZER_TYPES) and POOLS == tuple(POOLING)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["optim.label_smoothing=2"], "optim.label_smoothing must be in [0, 1), got 2"),
        (["optim.class_weights=x"], "optim.class_weights='x' is not valid; choose one of: auto, null or a list"),
        (["data.num_workers=-1"], "data.num_workers must be zero or positive"),
        (["finetune.l2sp=inf"], "finetune.l2sp must be a finite number"),
        (["log.max_images=0"], "log.max_images must be in [1, 64], got 0"),
        (["lr_find.min_lr=2"], "lr_find needs lr_find.min_lr < lr_find.max_lr"),
        (["model.pool=max"], "model.pool='max' is not valid; choose one of: avg, flatten"),
    ],
)
def test_single_key_rules_come_from_the_schema(args, expected):
    with pytest.raises(ConfigError) as err:
        load_config(["stage=frozen", *args])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_help_shows_choices_and_ranges_without_importing_torch():
    import subprocess
    import sys

    code = "import sys, train; train.main(['--help']); assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = {line.split("=", 1)[0].strip(): line for line in out.splitlines() if "=" in line}
    assert "choices: none | seed | standard | robust" in lines["data.augment"]
    assert "range: [0, 1)" in lines["optim.label_smoothing"] and "range: > 0" in lines["optim.lr"]
    assert "choices: rmsprop | adam | adamw | sgd" in lines["optim.name"]


def test_show_config_prints_the_values_a_stage_and_backbone_use_and_where_they_come_from(capsys):
    train.main(["stage=features", "model.backbone=efficientnet_lite0", "optim.lr=0.01", "--help"])
    lines = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert lines["stage=features"] == ["command", "line"]
    assert lines["optim.lr=0.01"] == ["command", "line"]  # the command line wins over the preset's 1e-3
    assert lines["optim.name=adamw"] == ["configs/backbone/efficientnet_lite0.yaml"]
    assert lines["trainer.max_epochs=30"] == ["configs/stage/features.yaml"]
    assert lines["seed=42"] == []  # the schema's default
    train.main(["--show-config"])  # the defaults of the default stage
    assert "stage=finetune" in capsys.readouterr().out


def test_predict_options_come_from_the_schema_and_are_checked(capsys):
    import predict
    from pipeline.config.schema import PredictConfig, schema_rows

    predict.main([])  # bare: its usage, generated from the schema
    out = capsys.readouterr().out
    assert out.startswith("usage: python predict.py") and all(f"  {r.key}=" in out for r in schema_rows(PredictConfig))
    with pytest.raises(SystemExit):
        predict.main(["ckpt_path=x.ckpt", "inputs=y", "export=tflite"])
    assert "export='tflite' is not valid; choose one of: onnx, torchscript" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.main(["ckpt_path=x.ckpt", "inputs=y", "batch_size=0"])
    assert "batch_size must be positive" in capsys.readouterr().err
