"""Few slices, many small classes: the semantic loss, class-balanced sampling and the all-background warning."""

import json
import logging

import numpy as np
import pytest
import torch

from samadapt.errors import TrainingError
from samadapt.train.diagnostics import collapse_warnings
from samadapt.train.losses import SegmentationLoss, balanced_class_weights
from samadapt.train.sampling import balanced_picks
from tests.train.test_trainer import make_trainer


def _target(small=4):
    """(2, 1, 16, 16): background, class 1 a small square in sample 0 only, class 2 half of sample 1."""
    target = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    target[0, 0, :small, :small] = 1
    target[1, 0, 8:] = 2
    return target


def _logits_for(target, channels, margin=8.0):
    return (torch.nn.functional.one_hot(target[:, 0], channels).permute(0, 3, 1, 2).float() - 0.5) * 2 * margin


def test_all_background_is_no_plateau_for_the_semantic_loss():
    target = _target()
    loss = SegmentationLoss(0.2, 0.8, multiclass=True)
    background = torch.zeros(2, 4, 16, 16)
    background[:, 0] = 8.0  # confident all-background answer
    perfect = _logits_for(target, 4)
    # classes 1 and 2 present, class 3 absent: the Dice term is over classes 1 and 2 only
    assert loss(perfect, target).item() < 0.01
    assert loss(background, target).item() > 0.8  # all-background: full Dice loss on both present classes
    # the absent class 3 adds nothing when it is not predicted: no constant share of the loss
    only_dice = SegmentationLoss(0.0, 1.0, multiclass=True)
    assert only_dice(perfect, target).item() < 1e-3
    # the gradient reaches the small class's logit at its pixels, pushing it up
    logits = background.clone().requires_grad_(True)
    loss(logits, target).backward()
    assert logits.grad[0, 1, :4, :4].mean() < 0 and logits.grad[0, 1, :4, :4].abs().mean() > 1e-4


def test_balanced_weights_lift_small_classes():
    target = _target(small=2)
    weights = balanced_class_weights(target, 4)
    counts = torch.bincount(target.flatten(), minlength=4).float()
    assert weights[1] > weights[2] > weights[0]  # rarer class, larger weight
    assert weights[3] == 1.0  # absent: no pixel uses it
    assert torch.isclose((weights * counts).sum() / counts.sum(), torch.tensor(1.0))
    # inverse square root: a class 16x rarer gets 4x the weight
    flat = torch.zeros(1, 1, 4, 17, dtype=torch.long)
    flat[0, 0, 0, :4], flat[0, 0, :, 4:] = 1, 2  # 4 pixels of class 1, 52 of class 2, 12 of background
    w = balanced_class_weights(flat, 3)
    assert torch.isclose(w[1] / w[2], torch.tensor((52 / 4) ** 0.5))


def test_unbalanced_semantic_ce_is_plain_cross_entropy():
    target = _target()
    logits = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = SegmentationLoss(1.0, 0.0, multiclass=True, balance=False)
    torch.testing.assert_close(plain(logits, target), torch.nn.functional.cross_entropy(logits, target[:, 0]))


def test_binary_loss_is_unchanged():
    from monai.losses import DiceCELoss

    logits = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    target = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    expected = DiceCELoss(sigmoid=True, lambda_ce=1.0, lambda_dice=0.8)(logits, target)
    torch.testing.assert_close(SegmentationLoss(1.0, 0.8)(logits, target), expected)


def test_balanced_picks_draw_a_rare_class_as_often_as_a_common_one():
    slice_classes = [(1,)] * 98 + [(1, 2), ()]  # class 2 in one slice of 100, one empty slice
    rng = np.random.default_rng(0)
    picks = balanced_picks(slice_classes, [1, 2], 4000, rng)
    share_rare = np.mean([p == 98 for p in picks])
    share_empty = np.mean([p == 99 for p in picks])
    # half of the non-empty draws go to class 2, i.e. to slice 98 (plus its share of the class 1 draws)
    assert 0.33 < share_rare < 0.45 and 0.2 < share_empty < 0.3
    assert balanced_picks(slice_classes, [1, 2], 50, np.random.default_rng(3)) == balanced_picks(
        slice_classes, [1, 2], 50, np.random.default_rng(3)
    )
    assert 99 not in balanced_picks([(1,), ()], [1], 200, np.random.default_rng(0), empty_share=0.0)
    with pytest.raises(TrainingError):
        balanced_picks([(3,), ()], [1, 2], 4, rng)


def _force_background(trainer):
    decode = trainer.model.decode

    def background_only(embeddings, *args, **kwargs):
        logits, iou = decode(embeddings, *args, **kwargs)
        logits = torch.full_like(logits, -10.0)
        if trainer.semantic:
            logits[:, 0] = 10.0
        return logits, iou

    trainer.model.decode = background_only


@pytest.mark.parametrize("recipe,classes", [("samed", (1, 2)), ("cheap-lunch", (1,))])
def test_all_background_predictions_are_reported(tmp_path, caplog, recipe, classes):
    trainer = make_trainer(tmp_path, recipe, classes, **{"train.steps": 1})
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    trainer.history = [{"step": 1, "loss": 0.79, "val_dice": 0.0}]
    _force_background(trainer)
    with caplog.at_level(logging.WARNING, logger="samadapt.train.diagnostics"):
        found = collapse_warnings(trainer)
    assert any("validation Dice stayed at 0" in w for w in found)
    assert any("only background" in w for w in found)
    assert "only background" in caplog.text
    saved = json.loads((tmp_path / "warnings.json").read_text())
    assert saved["warnings"] == found and saved["foreground_pixels_on_training_slices"] == 0


def test_a_working_model_raises_no_warning(tmp_path):
    trainer = make_trainer(tmp_path, "samed", (1, 2), **{"train.steps": 1})
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    decode = trainer.model.decode

    def foreground(embeddings, *args, **kwargs):
        logits, iou = decode(embeddings, *args, **kwargs)
        logits = torch.zeros_like(logits)
        logits[:, 1] = 1.0
        return logits, iou

    trainer.model.decode = foreground
    trainer.history = [{"step": 1, "loss": 0.5, "val_dice": 0.4}]
    assert collapse_warnings(trainer) == []
    assert json.loads((tmp_path / "warnings.json").read_text())["warnings"] == []
