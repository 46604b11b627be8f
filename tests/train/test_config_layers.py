"""One assembly path for configurations (``train.config.layered_config``): recipe defaults < YAML file < flags <
--set, for ``samadapt train`` / ``pretrain``, the demo's recipes and the app's adapt job."""

import pytest

from samadapt.cli import build_parser
from samadapt.cli.pretrain import build_config as pretrain_config
from samadapt.cli.train import build_config as train_config
from samadapt.errors import ConfigError
from samadapt.train.config import TrainConfig, layered_config
from samadapt.train.recipes import RECIPES, recipe_defaults


def test_each_layer_overrides_the_one_before(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("train:\n  steps: 7\n  batch_size: 3\noptim:\n  lr: 0.5\n")
    args = build_parser().parse_args(
        ["train", "--recipe", "samed", "--data", "d", "--out", "o", "--config", str(config_file), "--steps", "9"]
        + ["--set", "optim.lr=0.25"]
    )
    config = train_config(args)
    assert config.recipe == "samed" and config.peft.method == "lora"  # the recipe
    assert config.train.batch_size == 3  # the file
    assert config.train.steps == 9  # the flag beats the file
    assert config.optim.lr == 0.25  # --set beats everything
    assert config.loss.ce == RECIPES["samed"]["loss"]["ce"]  # untouched by any layer


def test_pretrain_goes_the_same_way():
    args = build_parser().parse_args(
        ["pretrain", "--data", "d", "--out", "o", "--recipe", "samed", "--steps", "4", "--set", "train.steps=5"]
    )
    config = pretrain_config(args)
    assert config.recipe == "samed" and config.peft.method == "lora" and config.train.steps == 5


def test_flag_values_are_taken_as_given_not_reparsed():
    # YAML would read "a: b" as a mapping and "yes" as true; a path is a path
    for path in ("/scans/a: b", "yes", "1e3"):
        config = layered_config(TrainConfig, recipe_defaults("msa"), flags={"data.path": path, "model.init": None})
        assert config.data.path == path and config.model.init is None  # None: the flag was not given
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        layered_config(TrainConfig, recipe_defaults("msa"), flags={"train.stepz": 3})
    with pytest.raises(ConfigError, match="needs a number"):
        layered_config(TrainConfig, recipe_defaults("msa"), flags={"train.steps": "many"})


def test_the_demo_recipes_are_layered_configs():
    from samadapt.demo import recipe_config

    config = recipe_config("cheap-lunch", 40, 2, 3, device="cpu")
    expected = recipe_defaults("cheap-lunch")
    assert config.optim.lr == expected["optim"]["lr"]  # no lr given: the recipe's
    assert (config.train.steps, config.train.batch_size, config.train.seed) == (40, 2, 3)
    assert (config.train.val_every, config.optim.warmup_steps, config.train.device) == (0, 4, "cpu")
    assert recipe_config("samed", 5, 1, 0, lr=2e-4).optim.lr == 2e-4
    assert recipe_config("samed", 5, 1, 0).train.device == "auto"
