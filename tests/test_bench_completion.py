"""bench/completion.py's choice of the labelled slices and its per-structure scores, on hand-made volumes."""

import math

import numpy as np

from bench.completion import scores, spread_slices


def test_labelled_slices_spread_evenly_over_the_structures_extent():
    labels = np.zeros((40, 4, 4), np.int64)
    labels[10:31, 1, 1] = 2  # labelled slices 10..30
    assert spread_slices(labels, 1) == [20]
    assert spread_slices(labels, 3) == [13, 20, 27]  # 10 + 20 * (0.5, 1.5, 2.5) / 3
    assert spread_slices(labels, 6) == [12, 15, 18, 22, 25, 28]


def test_scores_per_structure():
    truth = np.zeros((2, 4, 4), np.int64)
    truth[0, :2, :2] = 1  # 4 voxels of class 1
    prediction = truth.copy()
    prediction[1, 0, 0] = 1  # one false positive
    result = scores(prediction, truth, {1: "organ", 2: "absent"}, (1.0, 1.0, 1.0))
    assert math.isclose(result["organ"]["dice"], 2 * 4 / (5 + 4))
    assert math.isnan(result["absent"]["hd95_mm"])
