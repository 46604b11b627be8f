"""Overfitting check on one real slice: the recipe can fit what it is shown."""

import numpy as np
import pytest

from samadapt.data import SliceDataset, load_dataset
from samadapt.eval.evaluate import evaluate_slices
from samadapt.runs import load_run
from samadapt.train.api import fit_slices
from samadapt.train.config import TrainConfig, apply_overrides, from_dict
from samadapt.train.recipes import recipe_defaults


@pytest.mark.slow
def test_cheap_lunch_on_one_real_slice_reaches_dice_above_0_9(tmp_path, demo_data):
    slices = SliceDataset(load_dataset(demo_data["lesions"]))
    # the largest lung lesion slice: a point-prompted LiteMedSAM starts near Dice 0 on it
    candidates = slices.indices([1], ["lung2"])
    item = max((slices[i] for i in candidates), key=lambda it: int((it["label"] == 1).sum()))
    overrides = [
        "train.steps=30",
        "train.batch_size=2",
        "train.val_every=0",
        "data.augment=false",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "train.precision=fp32",  # the same numbers with and without native bfloat16
    ]
    config = from_dict(TrainConfig, apply_overrides(recipe_defaults("cheap-lunch"), overrides))
    fit_slices(config, [item], [], {1: "lesion"}, tmp_path, "percentile_slice", verbose=False)
    adapted = load_run(tmp_path, checkpoint="last")
    before = evaluate_slices(load_run("lite_medsam"), [item], {1: "lesion"}, "point:1", progress=False)
    after = evaluate_slices(adapted, [item], {1: "lesion"}, "point:1", progress=False)
    assert after.summary["mean_dice"] > 0.9, (before.summary["mean_dice"], after.summary["mean_dice"])
    assert after.summary["mean_dice"] > before.summary["mean_dice"]
    assert np.isfinite(after.summary["mean_hd95_mm"])
