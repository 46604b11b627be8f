"""peft.blend (WiSE-FT): blend 0 is the base model, 1 the trained one, 0.5 halfway in weight space; validation
between training steps blends the values just trained; a blended model is never saved."""

import copy

import pytest
import torch

from samadapt.errors import ConfigError, RunError
from samadapt.peft import (
    Adapter,
    LoRALinear,
    PeftConfig,
    apply_peft,
    blended,
    current_blend,
    merge_lora,
    save_adapter,
    set_blend,
)
from tests.conftest import make_tiny_sam
from tests.peft.test_peft import inputs, randomise_trainable_weights, run

CONFIGS = [
    PeftConfig(method="msa"),
    PeftConfig(method="lora", train_modules=["mask_decoder.iou_prediction_head"]),
    PeftConfig(method="msa+lora", depth=True),
]
IDS = ["msa", "lora+iou-head", "msa+lora-depth"]


def adapted_pair(config):
    base = make_tiny_sam()
    adapted = apply_peft(copy.deepcopy(base), config)
    randomise_trainable_weights(adapted)
    return base, adapted


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("merged", [False, True])
def test_blend_zero_is_the_base_model_and_one_gives_the_trained_model_back(config, merged):
    base, adapted = adapted_pair(config)
    if merged:
        merge_lora(adapted)
    images, points = inputs()
    tolerance = 1e-5 if merged else 0  # merging and un-merging at each weight rounds the merged weights
    with torch.no_grad():
        expected_base, expected_adapted = run(base, images, points), run(adapted, images, points)
        assert not torch.allclose(expected_adapted[0], expected_base[0], atol=1e-3)
        set_blend(adapted, 0.0)
        for ours, theirs in zip(run(adapted, images, points), expected_base, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=tolerance)
        set_blend(adapted, 0.5)
        halfway = run(adapted, images, points)[0]
        assert not torch.allclose(halfway, expected_base[0], atol=1e-3)
        assert not torch.allclose(halfway, expected_adapted[0], atol=1e-3)
        set_blend(adapted, 1.0)
        for ours, theirs in zip(run(adapted, images, points), expected_adapted, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=tolerance)
    assert current_blend(adapted) == 1.0 and not hasattr(adapted, "peft_trained_values")
    assert all(m.merged == merged for m in adapted.modules() if isinstance(m, LoRALinear))


def test_half_blend_is_halfway_in_weight_space():
    """A LoRA update and a fully trained tensor at half their change; an adapter's output halved."""
    base, adapted = adapted_pair(CONFIGS[1])
    layer = next(m for m in adapted.modules() if isinstance(m, LoRALinear))
    full_update = layer.delta_weight().clone()
    head = "mask_decoder.iou_prediction_head.layers.0.weight"
    trained_head = dict(adapted.named_parameters())[head].detach().clone()
    base_head = dict(base.named_parameters())[head]
    merge_lora(adapted)
    set_blend(adapted, 0.5)
    torch.testing.assert_close(layer.weight, layer.weight - layer.delta_weight() + 0.5 * full_update)
    torch.testing.assert_close(dict(adapted.named_parameters())[head], (base_head + trained_head) / 2)

    adapter = Adapter(8, skip=False, scale=0.5)
    torch.nn.init.normal_(adapter.up.weight)
    x = torch.randn(3, 8)
    full = adapter(x)
    model = torch.nn.Sequential(adapter)
    with blended(model, 0.5):
        torch.testing.assert_close(adapter(x), full / 2)
    torch.testing.assert_close(adapter(x), full, rtol=0, atol=0)


def test_validation_between_steps_blends_the_values_just_trained():
    """blended() takes the trained values when it starts, so a training loop that validates at its blend between
    optimiser steps blends the newest weights and trains on from them exactly."""
    base, adapted = adapted_pair(CONFIGS[1])
    head = "mask_decoder.iou_prediction_head.layers.0.weight"
    param = dict(adapted.named_parameters())[head]
    base_head = dict(base.named_parameters())[head]
    with blended(adapted, 0.5):
        pass
    with torch.no_grad():
        param.add_(1.0)  # an optimiser step
    trained = param.detach().clone()
    with blended(adapted, 0.5):
        torch.testing.assert_close(param, (base_head + trained) / 2)
    torch.testing.assert_close(param, trained, rtol=0, atol=0)
    with pytest.raises(ValueError, match="inside"), blended(adapted, 0.25):
        raise ValueError("inside the block")
    torch.testing.assert_close(param, trained, rtol=0, atol=0)
    assert current_blend(adapted) == 1.0


def test_a_blended_model_is_not_saved_and_wrong_uses_are_refused(tmp_path):
    from samadapt.models.mask_decoder import make_semantic_decoder
    from samadapt.train.config import TrainConfig

    _, adapted = adapted_pair(CONFIGS[0])
    set_blend(adapted, 0.5)
    manifest = {"base_model": "tiny", "base_sha256": "0" * 64, "peft": CONFIGS[0].to_dict()}
    with pytest.raises(RuntimeError, match="before saving"):
        save_adapter(adapted, tmp_path / "adapter", manifest)
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        set_blend(adapted, 1.5)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        PeftConfig(blend=-0.1)
    with pytest.raises(ConfigError, match="prompted runs"):
        TrainConfig(task="semantic", peft=PeftConfig(blend=0.5))
    semantic = make_tiny_sam()
    make_semantic_decoder(semantic.mask_decoder, 2)
    apply_peft(semantic, PeftConfig(method="lora"))
    with pytest.raises(RunError, match="semantic"):
        set_blend(semantic, 0.5)
    with pytest.raises(RunError, match="no PEFT"):
        set_blend(make_tiny_sam(), 0.5)
