"""Prompt mixing (``prompt.kind=mixed``): boxes and clicks drawn per object per step at the set share, and the loss
of a mixed batch is the sample-weighted mean of its box part and its click part; one click alone trains the best of
SAM's three candidates (``prompt.multimask``)."""

import numpy as np
import pytest
import torch

from samadapt.peft import apply_peft
from samadapt.train.config import PromptConfig
from samadapt.train.forward import LossForward
from samadapt.train.samples import draw_prompt_batch, prepare_slices
from tests.conftest import make_tiny_sam
from tests.train.test_trainer import disc_items, make_config, make_trainer


@pytest.mark.parametrize("share", [0.0, 0.25, 0.7, 1.0])
def test_mixed_batches_prompt_objects_by_box_at_the_set_share(share):
    slices = prepare_slices(disc_items(count=4), 128)
    prompt = PromptConfig(kind="mixed", box_share=share)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(500):
        batch = draw_prompt_batch(slices, [0, 1, 2, 3], [1, 2], prompt, "mixed", rng, do_augment=True)
        assert batch.points is not None and batch.boxes is not None  # every sample carries both; box_rows picks
        assert batch.points[0].shape == (4, 1, 2) and batch.boxes.shape == (4, 4)
        rows.append(batch.box_rows.numpy())
    rows = np.concatenate(rows)
    assert len(rows) == 2000
    # binomial standard deviation at n = 2000 is <= 0.012: 0.04 is more than 3 of them
    assert abs(rows.mean() - share) < 0.04
    if 0 < share < 1:  # both kinds within single batches, not a coin per step
        per_batch = rows.reshape(500, 4).sum(1)
        assert ((per_batch > 0) & (per_batch < 4)).mean() > 0.4


def test_point_and_box_batches_are_unchanged_by_the_setting():
    slices = prepare_slices(disc_items(count=4), 128)
    a = draw_prompt_batch(slices, [0, 1], [1], PromptConfig(), "point", np.random.default_rng(3), True)
    b = draw_prompt_batch(slices, [0, 1], [1], PromptConfig(box_share=0.9), "point", np.random.default_rng(3), True)
    assert a.box_rows is None and a.boxes is None
    assert torch.equal(a.points[0], b.points[0]) and torch.equal(a.targets, b.targets)


def test_mixed_loss_is_the_weighted_mean_of_its_box_and_click_parts():
    config = make_config("cheap-lunch", **{"prompt.kind": "mixed", "prompt.box_share": 0.5})
    model = make_tiny_sam(128)
    apply_peft(model, config.peft)
    model.eval()
    slices = prepare_slices(disc_items(count=3), 128)
    batch = draw_prompt_batch(slices, [0, 1, 2], [1], config.prompt, "mixed", np.random.default_rng(0), False)
    batch.box_rows = torch.tensor([True, False, False])
    forward = LossForward(model, torch.nn.MSELoss(), 0, np.random.default_rng(0))
    with torch.no_grad():
        mixed = forward(batch.images, batch.targets, batch.points, batch.boxes, batch.box_rows)
        boxed = forward(batch.images[:1], batch.targets[:1], None, batch.boxes[:1])
        clicked = forward(batch.images[1:], batch.targets[1:], tuple(t[1:] for t in batch.points), None)
    assert mixed.item() == pytest.approx((boxed.item() + 2 * clicked.item()) / 3, rel=1e-5)
    assert boxed.item() != pytest.approx(clicked.item(), rel=1e-3)  # the parts differ: the weighting is tested


def test_a_mixed_run_trains(tmp_path):
    trainer = make_trainer(tmp_path, **{"prompt.kind": "mixed", "prompt.box_share": 0.5, "train.steps": 2})
    result = trainer.fit()
    assert result.steps == 2 and all(np.isfinite(row["loss"]) for row in result.history)


def test_box_share_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="box_share"):
        make_config("cheap-lunch", **{"prompt.box_share": 1.5})


def test_one_click_trains_the_best_of_three_candidates():
    config = make_config("cheap-lunch", **{"prompt.kind": "point", "prompt.multimask": True})
    model = make_tiny_sam(128)
    apply_peft(model, config.peft)
    model.eval()
    slices = prepare_slices(disc_items(count=3), 128)
    batch = draw_prompt_batch(slices, [0, 1, 2], [1], config.prompt, "point", np.random.default_rng(0), False)
    forward = LossForward(model, torch.nn.MSELoss(), 0, np.random.default_rng(0), multimask=True)
    with torch.no_grad():
        loss = forward(batch.images, batch.targets, batch.points, None)
        logits, _ = model.decode(model.encode_image(batch.images), batch.points, None, multimask_output=True)
        up = torch.nn.functional.interpolate(logits, size=(128, 128), mode="bilinear", align_corners=False)
        per = ((up - batch.targets) ** 2).mean(dim=(2, 3))  # (B, 3): each candidate's loss per sample
        single = LossForward(model, torch.nn.MSELoss(), 0, np.random.default_rng(0))(
            batch.images, batch.targets, batch.points, None
        )
    assert loss.item() == pytest.approx(per.min(1).values.mean().item(), rel=1e-5)
    assert loss.item() != pytest.approx(single.item(), rel=1e-3)  # not the single-mask output's loss
    # two clicks are not ambiguous: the single-mask output, multimask or not
    two = (torch.cat([batch.points[0]] * 2, 1), torch.cat([batch.points[1]] * 2, 1))
    with torch.no_grad():
        a = forward(batch.images, batch.targets, two, None)
        b = LossForward(model, torch.nn.MSELoss(), 0, np.random.default_rng(0))(batch.images, batch.targets, two, None)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_a_multimask_run_with_mixed_prompts_trains(tmp_path):
    overrides = {"prompt.kind": "mixed", "prompt.box_share": 0.5, "prompt.multimask": True, "train.steps": 2}
    result = make_trainer(tmp_path, **overrides).fit()
    assert result.steps == 2 and all(np.isfinite(row["loss"]) for row in result.history)
