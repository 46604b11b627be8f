"""Post-processing decided by evaluation: whether ``components.keep_largest`` pays, judged on labelled slices.

Here, not in ``components`` (base layer), because the judgement scores with ``eval.metrics.dice``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from samadapt.components import largest_component
from samadapt.eval.metrics import dice


def decide_largest_component(
    cases: Sequence[tuple[np.ndarray, np.ndarray, Sequence[int] | None]], classes: Collection[int]
) -> dict[int, dict]:
    """Per class, whether ``keep_largest`` pays, judged on labelled slices (nnU-Net's rule, on the slices at hand).

    Each case is (prediction, labels, slices): the (Z, Y, X) label volume predicted in full (slices along axis 0),
    the reference labels on the same grid, and the indices along axis 0 of the slices whose labels are known (None:
    all). The largest component is taken in 3D over the whole prediction, and each labelled slice is scored in 2D
    (Dice; a slice where both masks are empty does not count). A class takes the rule when its mean Dice over those
    slices is higher with it than without (strictly, as nnU-Net); with no slice to judge on it does not. A slice that
    the rule empties of a false positive (nothing to find there) scores 1 with it.

    Returns:
        {class id: {"apply": bool, "dice": mean Dice as predicted, "dice_largest": with the rule, "slices": count}}.
    """
    decisions = {}
    for class_id in classes:
        raw, largest = [], []
        for prediction, reference, slices in cases:
            mask = np.asarray(prediction) == class_id
            kept = largest_component(mask)
            truth = np.asarray(reference) == class_id
            for z in range(mask.shape[0]) if slices is None else slices:
                before, after = dice(mask[z], truth[z]), dice(kept[z], truth[z])
                if not np.isnan(before):
                    raw.append(before)
                    largest.append(1.0 if np.isnan(after) else after)  # a false positive removed: both empty
        before = float(np.mean(raw)) if raw else float("nan")
        after = float(np.mean(largest)) if largest else float("nan")
        decisions[int(class_id)] = {
            "apply": bool(raw) and after > before,
            "dice": before,
            "dice_largest": after,
            "slices": len(raw),
        }
    return decisions
