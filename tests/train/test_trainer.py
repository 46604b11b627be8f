"""The trainer on tiny synthetic data: loss goes down, checkpoints, resume, NaN guard, config errors."""

import copy
import math

import numpy as np
import pytest
import torch

from samadapt.errors import TrainingError
from samadapt.peft import PeftConfig, apply_peft
from samadapt.runs import Manifest
from samadapt.train.config import TrainConfig, apply_overrides, from_dict
from samadapt.train.recipes import recipe_defaults
from samadapt.train.samples import prepare_slices
from samadapt.train.trainer import Trainer
from tests.conftest import make_tiny_sam


def disc_items(count=6, size=96, seed=0):
    """Slices with a bright disc (class 1) and a dim square (class 2) on noise."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.integers(30, size - 30, size=2)
        label = np.zeros((size, size), np.int64)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 < 15**2] = 1
        label[5:20, 5:25] = 2
        image = 0.2 * rng.random((size, size)) + 0.7 * (label == 1) + 0.35 * (label == 2)
        image = image.astype(np.float32) / image.max()  # preprocessed: [0, 1]
        items.append({"image": image, "label": label, "case": f"c{i // 3}", "slice": i % 3, "spacing": (1.0, 1.0)})
    return items


def make_config(recipe="cheap-lunch", **overrides):
    data = recipe_defaults(recipe)
    data = apply_overrides(data, [f"{k}={v}" for k, v in overrides.items()])
    return from_dict(TrainConfig, data)


def make_trainer(tmp_path, recipe="cheap-lunch", classes=(1,), seed=0, **overrides):
    overrides = {"train.steps": 4, "train.batch_size": 2, "train.val_every": 2, "train.precision": "fp32", **overrides}
    config = make_config(recipe, **overrides)
    model = make_tiny_sam(img_size=128)  # the same base model every time, as a checkpoint would give
    if config.task == "semantic":
        from samadapt.models.mask_decoder import make_semantic_decoder

        make_semantic_decoder(model.mask_decoder, len(classes))
    torch.manual_seed(seed)
    apply_peft(model, config.peft)
    items = disc_items()
    manifest = Manifest(base_model="tiny", base_sha256="0" * 64, peft=config.peft.to_dict())
    return Trainer(config, model, prepare_slices(items[:4], 128), items[4:], list(classes), tmp_path, manifest)


@pytest.mark.parametrize("recipe,classes", [("cheap-lunch", (1,)), ("msa", (1,)), ("samed", (1, 2))])
def test_recipes_lower_the_loss(tmp_path, recipe, classes):
    trainer = make_trainer(tmp_path, recipe, classes, **{"train.steps": 12, "optim.lr": 3e-3, "optim.warmup_steps": 0})
    result = trainer.fit()
    losses = [row["loss"] for row in result.history]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert (tmp_path / "checkpoints" / "best" / "adapter_model.safetensors").exists()
    assert (tmp_path / "checkpoints" / "last" / "trainer_state.pt").exists()
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "metrics.csv").exists()
    assert 0.0 <= result.last_val_dice <= 1.0


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    straight = make_trainer(tmp_path / "a", **{"train.steps": 6, "train.val_every": 3})
    straight.fit()
    interrupted = make_trainer(tmp_path / "b", **{"train.steps": 6, "train.val_every": 3})
    interrupted.fit(stop_after=3)  # "killed" after the step-3 checkpoint
    resumed = make_trainer(tmp_path / "b", seed=1, **{"train.steps": 6, "train.val_every": 3})
    resumed.fit(resume=True)
    assert resumed.step == 6
    a = {k: v for k, v in straight.model.named_parameters() if v.requires_grad}
    b = {k: v for k, v in resumed.model.named_parameters() if v.requires_grad}
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, **{"train.steps": 4, "train.val_every": 2})
    trainer.fit(stop_after=2)
    good = (tmp_path / "checkpoints" / "last" / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():  # poison a trained weight
        next(p for p in trainer.model.parameters() if p.requires_grad).fill_(math.nan)
    with pytest.raises(TrainingError, match="loss became nan.*last good checkpoint"):
        trainer.fit()
    assert (tmp_path / "checkpoints" / "last" / "adapter_model.safetensors").read_bytes() == good


def test_unknown_config_key_is_an_error_naming_it():
    with pytest.raises(ValueError, match="optim.lrr"):
        make_config(**{"optim.lrr": 0.1})
    with pytest.raises(ValueError, match="train.grad_checkpointing"):
        from_dict(TrainConfig, {"train": {"grad_checkpointing": "maybe"}})
    config = make_config(**{"train.grad_checkpointing": "False"})
    assert config.train.grad_checkpointing is False  # the string "False" is false, not truthy


def test_dataset_without_the_requested_class_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="requested classes"):
        make_trainer(tmp_path, classes=(7,))


def test_frozen_batchnorm_stays_frozen_in_training():
    """LiteMedSAM's TinyViT has BatchNorm: PEFT training must not update its running statistics."""
    from samadapt.models.registry import build_model
    from samadapt.peft.inject import train_mode

    model = build_model("lite_medsam", pretrained=False)
    apply_peft(model, PeftConfig(method="lora"))
    before = copy.deepcopy(model.state_dict())
    train_mode(model)
    with torch.no_grad():
        model.encode_image(torch.rand(2, 3, 256, 256))
    for key, value in model.state_dict().items():
        if "running" in key or "num_batches" in key:
            assert torch.equal(value, before[key]), key


def test_mask_iou_on_hand_computed_masks():
    from samadapt.train.forward import mask_iou

    pred = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    target = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    pred[0, 0, :2, :2] = True  # 4 pixels
    target[0, 0, :2, :3] = True  # 6 pixels, 4 shared -> IoU 4 / 6
    target[1, 0, 0, 0] = True  # empty prediction of a one-pixel target -> 0
    # sample 2: both empty -> 1 (a correct "nothing here")
    torch.testing.assert_close(mask_iou(pred, target), torch.tensor([[4 / 6], [0.0], [1.0]]))


@pytest.mark.slow
def test_the_iou_head_learns_the_true_iou_of_its_mask(tmp_path):
    """With the IoU loss the IoU head gets gradients and its error on the training slices falls; without, no grad."""
    from samadapt.train.forward import mask_iou

    trainer = make_trainer(
        tmp_path, **{"train.steps": 30, "train.val_every": 0, "optim.lr": 3e-3, "optim.warmup_steps": 0}
    )
    head = trainer.model.mask_decoder.iou_prediction_head
    assert all(p.requires_grad for p in head.parameters())  # the cheap-lunch recipe trains it

    def iou_error() -> float:
        errors = []
        with torch.no_grad():
            for item in trainer.train_slices:
                image = item.image[None]
                mask = torch.from_numpy(item.label == 1)[None, None]
                ys, xs = np.nonzero(item.label == 1)
                points = (torch.tensor([[[float(xs.mean()), float(ys.mean())]]]), torch.ones(1, 1, dtype=torch.long))
                # one click: the recipe trains SAM's three candidates (prompt.multimask), the masks Predictor rates
                multimask = trainer.config.prompt.multimask
                embedding = trainer.model.encode_image(image)
                logits, score = trainer.model.decode(embedding, points, multimask_output=multimask)
                up = torch.nn.functional.interpolate(logits, size=image.shape[-2:], mode="bilinear")
                errors.append(float((score - mask_iou(up > 0, mask)).abs().mean()))
        return float(np.mean(errors))

    before = iou_error()
    trainer.fit()
    assert iou_error() < 0.5 * before

    without = make_trainer(tmp_path / "no_iou", **{"loss.iou": 0.0})
    without.train_step()
    assert all(p.grad is None or not p.grad.any() for p in without.model.mask_decoder.iou_prediction_head.parameters())


def test_validation_scores_the_run_at_its_blend_and_training_keeps_the_full_update(tmp_path):
    """peft.blend 0: every validation scores the base model, while the weights trained and saved move freely."""
    from safetensors.torch import load_file

    from samadapt.peft import current_blend, disable_adapters

    trainer = make_trainer(tmp_path, "msa", **{"peft.blend": 0.0, "optim.lr": 3e-3, "optim.warmup_steps": 0})
    result = trainer.fit()
    assert current_blend(trainer.model) == 1.0
    trainer.config.peft.blend = 1.0
    with disable_adapters(trainer.model):
        base_dice = trainer.validate()
    assert result.last_val_dice == base_dice
    saved = load_file(tmp_path / "checkpoints" / "last" / "adapter_model.safetensors")
    params = dict(trainer.model.named_parameters())
    assert any(name.endswith("up.weight") and value.abs().max() > 0 for name, value in saved.items())
    for name, value in saved.items():
        torch.testing.assert_close(value, params[name].detach(), rtol=0, atol=0, msg=name)
