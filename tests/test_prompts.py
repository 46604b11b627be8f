"""Simulated prompts: where clicks land, boxes, empty masks, determinism."""

import numpy as np
import pytest
from scipy import ndimage

from samadapt.prompts import box_from_mask, centre_click, corrective_click, iterative_clicks, objects, random_click


def blob(shape=(40, 50)):
    mask = np.zeros(shape, bool)
    mask[5:25, 10:40] = True
    mask[25:35, 10:15] = True
    return mask


def test_centre_click_is_inside_and_farthest_from_the_boundary():
    mask = blob()
    click = centre_click(mask)
    assert mask[int(click.y), int(click.x)]
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    assert distance[int(click.y), int(click.x)] == distance.max()  # brute force: no pixel is deeper


def test_corrective_clicks_land_in_the_largest_error_region_with_the_right_sign():
    gt = blob()
    missed = gt.copy()
    missed[5:25, 25:40] = False  # the prediction misses a 20 x 15 part
    click = corrective_click(gt, missed)
    assert click.positive and gt[int(click.y), int(click.x)] and not missed[int(click.y), int(click.x)]
    spill = gt.copy()
    spill[0:4, 0:30] = True  # a false positive region larger than any miss
    click = corrective_click(gt, spill)
    assert not click.positive and spill[int(click.y), int(click.x)] and not gt[int(click.y), int(click.x)]
    assert corrective_click(gt, gt) is None  # perfect prediction: nothing to correct


def test_iterative_clicks_use_the_prediction_so_far():
    gt = blob()
    seen = []

    def predict(clicks):
        seen.append(len(clicks))
        return gt if len(clicks) >= 2 else np.zeros_like(gt)

    clicks, prediction = iterative_clicks(gt, predict, 3)
    assert len(clicks) == 2 and seen == [1, 2] and (prediction == gt).all()  # stops once perfect


def test_box_jitter_stays_within_bounds_and_is_seeded():
    mask = blob()
    tight = box_from_mask(mask)
    np.testing.assert_array_equal(tight, [10, 5, 39, 34])
    for seed in range(50):
        box = box_from_mask(mask, jitter=6, rng=np.random.default_rng(seed))
        assert np.all(np.abs(box - tight) <= 6)
        assert 0 <= box[0] <= box[2] <= 49 and 0 <= box[1] <= box[3] <= 39
    a = box_from_mask(mask, jitter=6, rng=np.random.default_rng(3))
    b = box_from_mask(mask, jitter=6, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


def test_empty_masks_are_handled_without_crashing():
    empty = np.zeros((10, 10), bool)
    assert random_click(empty, np.random.default_rng(0)) is None
    assert centre_click(empty) is None
    assert box_from_mask(empty, jitter=3) is None
    assert iterative_clicks(empty, lambda c: empty, 3) == ([], None)
    assert list(objects(np.zeros((5, 5), int))) == []


def test_objects_by_class_and_by_instance():
    label = np.zeros((20, 20), int)
    label[2:5, 2:5] = 1
    label[10:15, 10:15] = 1
    label[16:19, 1:4] = 2
    assert [c for c, _ in objects(label)] == [1, 2]
    assert [c for c, _ in objects(label, mode="instance")] == [1, 1, 2]
    with pytest.raises(ValueError):
        list(objects(label, mode="voxel"))
