"""model.slice_position: the config rule, what trains, and a training slice without a position."""

import pytest

from samadapt.data.position import slice_position
from samadapt.errors import ConfigError, TrainingError
from samadapt.models.mask_decoder import make_semantic_decoder
from samadapt.peft import PeftConfig, apply_peft
from samadapt.runs import Manifest
from samadapt.train.config import TrainConfig, apply_overrides, from_dict
from samadapt.train.recipes import recipe_defaults
from samadapt.train.samples import prepare_slices
from samadapt.train.trainer import Trainer
from tests.conftest import make_tiny_sam


def test_the_slice_position_is_refused_for_the_prompt_task():
    with pytest.raises(ConfigError, match="model.slice_position needs task=semantic"):
        from_dict(TrainConfig, apply_overrides(recipe_defaults("cheap-lunch"), ["model.slice_position=true"]))
    config = from_dict(TrainConfig, apply_overrides(recipe_defaults("samed"), ["model.slice_position=true"]))
    assert config.task == "semantic" and config.model.slice_position
    assert not TrainConfig().model.slice_position  # off by default


def test_slice_positions_run_from_zero_to_one_and_a_single_slice_is_the_middle():
    assert [slice_position(z, 5) for z in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert slice_position(0, 1) == 0.5
    with pytest.raises(ValueError):
        slice_position(5, 5)


@pytest.mark.parametrize("method", ["lora", "msa"])
def test_the_slice_prior_trains_whatever_the_method(method):
    model = make_tiny_sam(64)
    make_semantic_decoder(model.mask_decoder, 2, slice_position=True)
    apply_peft(model, PeftConfig(method=method, train_modules=[]))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"mask_decoder.slice_prior.proj.weight", "mask_decoder.slice_prior.proj.bias"} <= trained


def test_training_refuses_slices_without_a_position(tmp_path):
    import numpy as np

    config = from_dict(TrainConfig, apply_overrides(recipe_defaults("samed"), ["model.slice_position=true"]))
    model = make_tiny_sam(64)
    make_semantic_decoder(model.mask_decoder, 1, slice_position=True)
    apply_peft(model, config.peft)
    label = np.zeros((32, 32), np.int64)
    label[8:16, 8:16] = 1
    item = {"image": np.random.default_rng(0).random((32, 32), dtype=np.float32), "label": label, "case": "c0"}
    manifest = Manifest(base_model="tiny", base_sha256="0" * 64, peft=config.peft.to_dict(), task="semantic")
    trainer = Trainer(config, model, prepare_slices([item], 64), [], [1], tmp_path / "run", manifest)
    with pytest.raises(TrainingError, match="position"):
        trainer.train_step()
    trainer = Trainer(
        config, model, prepare_slices([{**item, "position": 0.4}], 64), [], [1], tmp_path / "r2", manifest
    )
    assert np.isfinite(trainer.train_step()["loss"])
