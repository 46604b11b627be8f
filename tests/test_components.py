"""Connected components on hand-built masks: the prompt-consistent filter (clicks, boxes, the nearest component when
none is touched) and the per-class 3D largest-component rule with its decision from labelled slices."""

import numpy as np
import pytest

from samadapt.components import (
    keep_largest,
    keep_prompted,
    keep_prompted_batch,
    largest_component,
)
from samadapt.errors import ConfigError
from samadapt.eval.postprocess import decide_largest_component
from samadapt.predict import Predictor
from tests.conftest import make_tiny_sam


def three_blobs() -> np.ndarray:
    """(20, 30): blob A rows 2-5 x cols 2-5, blob B rows 2-5 x cols 20-27, blob C rows 14-17 x cols 10-13."""
    mask = np.zeros((20, 30), bool)
    mask[2:6, 2:6] = True  # A
    mask[2:6, 20:28] = True  # B
    mask[14:18, 10:14] = True  # C
    return mask


def only(*names: str) -> np.ndarray:
    blobs = {"A": (slice(2, 6), slice(2, 6)), "B": (slice(2, 6), slice(20, 28)), "C": (slice(14, 18), slice(10, 14))}
    mask = np.zeros((20, 30), bool)
    for name in names:
        mask[blobs[name]] = True
    return mask


def test_a_positive_click_keeps_the_component_it_falls_on():
    mask = three_blobs()
    kept = keep_prompted(mask, np.array([[3, 4]]), np.array([1]))  # (x, y) = (3, 4): inside A
    assert np.array_equal(kept, only("A"))
    # two positive clicks on two components keep both; a negative click chooses nothing
    kept = keep_prompted(mask, np.array([[3, 4], [25, 3], [11, 15]]), np.array([1, 1, 0]))
    assert np.array_equal(kept, only("A", "B"))


def test_a_box_keeps_the_components_it_overlaps_and_clicks_add_theirs():
    mask = three_blobs()
    assert np.array_equal(keep_prompted(mask, box=np.array([8, 12, 16, 19])), only("C"))
    assert np.array_equal(keep_prompted(mask, box=np.array([5, 0, 21, 19])), mask)  # touches a corner of A and B
    kept = keep_prompted(mask, np.array([[22, 4]]), np.array([1]), box=np.array([8, 12, 16, 19]))
    assert np.array_equal(kept, only("B", "C"))


def test_nothing_touched_keeps_the_nearest_component_never_an_empty_mask():
    mask = three_blobs()
    kept = keep_prompted(mask, np.array([[17, 4]]), np.array([1]))  # (x, y) = (17, 4): 3 from B (x = 20), 12 from A
    assert np.array_equal(kept, only("B"))
    kept = keep_prompted(mask, np.array([[11, 10]]), np.array([1]))  # 4 above C (y = 14); A's corner is 7.8 away
    assert np.array_equal(kept, only("C"))
    # a box beside every component: the one nearest to the box (C's top row 14 is 2 below the box's bottom, 12)
    kept = keep_prompted(mask, box=np.array([7, 8, 16, 12]))
    assert np.array_equal(kept, only("C"))
    assert keep_prompted(mask, np.array([[17, 4]]), np.array([1])).any()


def test_what_the_filter_leaves_alone():
    mask = three_blobs()
    assert np.array_equal(keep_prompted(mask, np.array([[17, 4]]), np.array([0])), mask)  # negative clicks only
    assert np.array_equal(keep_prompted(mask), mask)  # no prompt at all
    empty = np.zeros((20, 30), bool)
    assert not keep_prompted(empty, np.array([[3, 4]]), np.array([1])).any()
    one = only("A")
    assert np.array_equal(keep_prompted(one, np.array([[25, 15]]), np.array([1])), one)  # one component: kept
    diagonal = np.zeros((6, 6), bool)
    diagonal[1, 1] = diagonal[2, 2] = diagonal[5, 5] = True  # 8-connected: (1,1) and (2,2) are one component
    expected = np.zeros((6, 6), bool)
    expected[1, 1] = expected[2, 2] = True
    assert np.array_equal(keep_prompted(diagonal, np.array([[1, 1]]), np.array([1])), expected)


def test_the_batch_form_gives_each_prompt_set_its_own_prompts():
    mask = three_blobs()
    masks = np.stack([mask, mask])[:, None]  # (P=2, K=1, H, W)
    points = np.array([[[3, 4]], [[11, 15]]], np.float32)  # (P, N, 2)
    kept = keep_prompted_batch(masks, points, np.array([[1], [1]]))
    assert np.array_equal(kept[0, 0], only("A")) and np.array_equal(kept[1, 0], only("C"))
    boxes = np.array([[8, 12, 16, 19], [18, 0, 29, 8]])
    kept = keep_prompted_batch(masks, boxes=boxes)
    assert np.array_equal(kept[0, 0], only("C")) and np.array_equal(kept[1, 0], only("B"))
    kept = keep_prompted_batch(masks[:1], np.array([[3, 4]]), np.array([1]))  # one prompt set as (N, 2) / (N,)
    assert np.array_equal(kept[0, 0], only("A"))


def test_the_predictor_option_filters_the_masks_it_returns():
    predictor = Predictor(make_tiny_sam(64), device="cpu")
    filtered = Predictor(predictor.model, device="cpu", keep_components="prompt")
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    for p in (predictor, filtered):
        p.set_image(image, preprocessed=True)
    for prompt in (
        dict(points=np.array([[20, 30]]), labels=np.array([1])),
        dict(boxes=np.array([[10, 10, 40, 50]])),
        dict(points=np.array([[20, 30], [50, 5]]), labels=np.array([1, 0]), boxes=np.array([10, 10, 40, 50])),
    ):
        raw = predictor.predict(**prompt)
        got = filtered.predict(**prompt)
        assert np.array_equal(got.masks, keep_prompted_batch(raw.masks, **prompt))
        assert np.array_equal(got.low_res_logits.numpy(), raw.low_res_logits.numpy())  # logits as decoded
    with pytest.raises(ConfigError, match="keep-components"):
        Predictor(predictor.model, device="cpu", keep_components="largest")


# ------------------------------------------------------------------------------------------------------------- 3D
def test_largest_component_in_3d_with_diagonal_neighbours():
    mask = np.zeros((4, 6, 6), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # 26-connected: one component of 3 voxels
    mask[0:2, 4:6, 4:6] = True  # 8 voxels: the largest
    expected = np.zeros_like(mask)
    expected[0:2, 4:6, 4:6] = True
    assert np.array_equal(largest_component(mask), expected)
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()


def test_keep_largest_touches_only_the_classes_asked_for():
    labels = np.zeros((3, 8, 8), np.int16)
    labels[:, 0:3, 0:3] = 1  # class 1: 27 voxels
    labels[1, 6, 6] = 1  # and a speck
    labels[:, 5:8, 0:2] = 2  # class 2: 18 voxels
    labels[0, 0, 7] = 2  # and a speck
    out = keep_largest(labels, [1])
    assert out[1, 6, 6] == 0 and out[0, 0, 7] == 2 and (out == 1).sum() == 27
    assert (keep_largest(labels, [1, 2]) == 2).sum() == 18
    assert labels[1, 6, 6] == 1  # the input is not changed


def test_the_rule_is_decided_per_class_from_labelled_slices():
    """Class 1: a false speck on labelled slice 3 (the rule helps). Class 2: two true halves, the smaller on labelled
    slice 0 (the rule hurts). Class 3: never labelled nor predicted (no evidence: no rule)."""
    pred = np.zeros((4, 10, 10), np.int16)
    truth = np.zeros_like(pred)
    pred[0:3, 1:4, 1:4] = truth[0:3, 1:4, 1:4] = 1  # class 1 body on slices 0-2: 9 pixels each
    pred[3, 8, 8] = 1  # a speck: slice 3 holds no class 1
    pred[0:3, 6:9, 1:4] = truth[0:3, 6:9, 1:4] = 2  # class 2 large half (27 voxels)
    pred[0, 6:8, 7:9] = truth[0, 6:8, 7:9] = 2  # class 2 small half on slice 0 (4 pixels)
    decisions = decide_largest_component([(pred, truth, [0, 3])], [1, 2, 3])
    # class 1: slice 0 Dice 1 both ways; slice 3: raw 0 (a speck, nothing true), with the rule empty = 1 -> 0.5 vs 1
    assert decisions[1] == {"apply": True, "dice": 0.5, "dice_largest": 1.0, "slices": 2}
    # class 2: slice 0 holds 9 + 4 true pixels; the rule keeps 9: Dice 2 * 9 / (9 + 13) = 0.818...; slice 3 empty
    assert decisions[2]["apply"] is False and decisions[2]["dice"] == 1.0
    assert decisions[2]["dice_largest"] == pytest.approx(18 / 22) and decisions[2]["slices"] == 1
    assert decisions[3]["apply"] is False and decisions[3]["slices"] == 0
    # every slice labelled (None): class 1 as before plus slices 1-2 at 1.0 -> (1 + 1 + 1 + 0) / 4 vs 1
    decisions = decide_largest_component([(pred, truth, None)], [1])
    assert decisions[1]["dice"] == 0.75 and decisions[1]["apply"] is True


def test_predict_volume_applies_the_largest_component_rule_to_the_classes_asked_for():
    from samadapt.predict import predict_volume
    from tests.test_predict_volume import semantic_run, two_objects

    run = semantic_run()
    volume, _ = two_objects(depth=5, side=40)
    raw = predict_volume(run, volume, device="cpu")
    assert not np.array_equal(keep_largest(raw, [1]), raw)  # this random model's class 1 is in several pieces
    assert np.array_equal(predict_volume(run, volume, device="cpu", largest_component=[1]), keep_largest(raw, [1]))
    assert np.array_equal(predict_volume(run, volume, device="cpu", largest_component="all"), keep_largest(raw, [1, 2]))


def test_the_largest_component_option_of_the_command_line():
    from samadapt.cli.options import largest_component_classes

    assert largest_component_classes(None) is None and largest_component_classes("all") == "all"
    assert largest_component_classes("3,1, 3") == [1, 3]
    with pytest.raises(ConfigError, match="--largest-component"):
        largest_component_classes("liver")
