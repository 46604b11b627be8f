"""Simulated prompts: where clicks land, boxes, empty masks, determinism."""

import numpy as np
import pytest

from samadapt.prompts import (
    Click,
    SliceMask,
    box_from_mask,
    centre_click,
    clicks_to_arrays,
    corrective_click,
    corrective_click_3d,
    error_region,
    grow_box,
    iterative_clicks,
    n_clicks,
    objects,
    propagate_box,
    random_click,
)


def blob(shape=(40, 50)):
    """An L-shaped object: a 20 x 30 block with a 10 x 5 leg, rows 5..34, columns 10..39."""
    mask = np.zeros(shape, bool)
    mask[5:25, 10:40] = True
    mask[25:35, 10:15] = True
    return mask


def brute_force_depth(mask):
    """Distance of each object pixel to the nearest background pixel, the outside of the image counting as background."""
    padded = np.pad(mask, 1)
    by, bx = np.nonzero(~padded)
    depth = np.zeros(mask.shape)
    for y, x in zip(*np.nonzero(mask), strict=True):
        depth[y, x] = np.sqrt(((by - (y + 1)) ** 2 + (bx - (x + 1)) ** 2).min())
    return depth


@pytest.mark.parametrize("touching_border", [False, True])
def test_centre_click_is_inside_and_farthest_from_the_boundary(touching_border):
    mask = blob()
    if touching_border:  # cut by the image border: the border is boundary too
        mask = mask[:, 20:]
    click = centre_click(mask)
    assert isinstance(click, Click) and click.positive
    x, y = int(click.x), int(click.y)
    assert mask[y, x]  # (x, y) = (column, row)
    depth = brute_force_depth(mask)
    assert depth[y, x] == pytest.approx(depth.max())
    assert x > 0 and depth[y, x] > 1


def test_points_are_x_column_y_row():
    mask = np.zeros((10, 30), bool)
    mask[2, 25] = True  # row 2, column 25
    assert centre_click(mask)[:2] == (25.0, 2.0)
    assert random_click(mask, np.random.default_rng(0))[:2] == (25.0, 2.0)
    coords, labels = clicks_to_arrays([Click(25.0, 2.0, True), Click(1.0, 3.0, False)])
    np.testing.assert_array_equal(coords, [[25, 2], [1, 3]])
    np.testing.assert_array_equal(labels, [1, 0])
    np.testing.assert_array_equal(box_from_mask(mask), [25, 2, 25, 2])


def test_corrective_clicks_land_in_the_largest_error_region_with_the_right_sign():
    gt = blob()
    missed = gt.copy()
    missed[5:25, 25:40] = False  # the prediction misses a 20 x 15 part
    missed[30:32, 11:13] = False  # and a smaller hole
    click = corrective_click(gt, missed)
    assert click.positive and gt[int(click.y), int(click.x)] and not missed[int(click.y), int(click.x)]
    assert 25 <= click.x < 40 and 5 <= click.y < 25
    region, positive = error_region(gt, missed)
    assert positive and region.sum() == 20 * 15
    spill = gt.copy()
    spill[0:4, 0:50] = True  # a false positive larger than any miss
    click = corrective_click(gt, spill)
    assert not click.positive and spill[int(click.y), int(click.x)] and not gt[int(click.y), int(click.x)]
    assert click.y == pytest.approx(1.0, abs=1)  # the middle row of the spill
    for seed in range(20):  # with a generator: a random pixel, still inside the error region
        click = corrective_click(gt, missed, rng=np.random.default_rng(seed))
        assert click.positive and 25 <= click.x < 40 and 5 <= click.y < 25
    assert corrective_click(gt, gt) is None  # perfect prediction: nothing to correct


def test_iterative_clicks_use_the_prediction_so_far():
    gt = blob()
    seen = []

    def predict(clicks):
        seen.append(len(clicks))
        return gt if len(clicks) >= 2 else np.zeros_like(gt)

    clicks, prediction = iterative_clicks(gt, predict, 3)
    assert len(clicks) == 2 and seen == [1, 2] and (prediction == gt).all()  # stops once perfect
    assert clicks[0] == centre_click(gt) and clicks[1].positive

    def overshoot(clicks):
        pred = gt.copy()
        pred[0:3, :] = len(clicks) < 3
        return pred

    clicks, _ = iterative_clicks(gt, overshoot, 5)
    assert [c.positive for c in clicks] == [True, False, False]


def test_box_jitter_stays_within_bounds_and_is_seeded():
    mask = blob()
    tight = box_from_mask(mask)
    np.testing.assert_array_equal(tight, [10, 5, 39, 34])
    edge = np.zeros((40, 50), bool)
    edge[0:3, 45:50] = True
    for seed in range(50):
        box = box_from_mask(mask, jitter=6, rng=np.random.default_rng(seed))
        assert np.all(np.abs(box - tight) <= 6)
        assert 0 <= box[0] <= box[2] <= 49 and 0 <= box[1] <= box[3] <= 39
        box = box_from_mask(edge, jitter=8, rng=np.random.default_rng(seed))  # clipped to the image
        assert 0 <= box[0] <= box[2] <= 49 and 0 <= box[1] <= box[3] <= 39
    a = box_from_mask(mask, jitter=6, rng=np.random.default_rng(3))
    b = box_from_mask(mask, jitter=6, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


def test_random_prompts_are_deterministic_with_a_seed():
    mask = blob()
    first = [random_click(mask, np.random.default_rng(7)) for _ in range(2)]
    assert first[0] == first[1] and mask[int(first[0].y), int(first[0].x)]
    a = n_clicks(mask, 4, np.random.default_rng(1))
    assert a == n_clicks(mask, 4, np.random.default_rng(1)) and a != n_clicks(mask, 4, np.random.default_rng(2))
    assert a[0] == centre_click(mask) and len(set(a)) == 4 and all(mask[int(c.y), int(c.x)] for c in a)
    single = np.zeros((5, 5), bool)
    single[2, 3] = True
    assert n_clicks(single, 3, np.random.default_rng(0)) == [Click(3.0, 2.0, True)] * 3


def test_empty_masks_are_handled_without_crashing():
    empty = np.zeros((10, 10), bool)
    assert random_click(empty, np.random.default_rng(0)) is None  # the reference crashed: "high <= 0"
    assert centre_click(empty) is None
    assert n_clicks(empty, 3, np.random.default_rng(0)) == []
    assert n_clicks(blob(), 0) == []
    assert box_from_mask(empty, jitter=3) is None
    assert corrective_click(empty, empty) is None
    calls = []
    assert iterative_clicks(empty, lambda c: calls.append(c) or empty, 3) == ([], None) and calls == []
    assert list(objects(np.zeros((5, 5), int))) == []
    with pytest.raises(ValueError, match="2D"):
        centre_click(np.zeros((2, 3, 4), bool))


def test_objects_by_class_and_by_instance():
    label = np.zeros((20, 20), int)
    label[2:5, 2:5] = 1
    label[10:15, 10:15] = 1
    label[15:17, 15:17] = 1  # touches the previous block by a corner: the same instance
    label[16:19, 1:4] = 2
    assert [c for c, _ in objects(label)] == [1, 2]
    instances = list(objects(label, mode="instance"))
    assert [c for c, _ in instances] == [1, 1, 2] and instances[1][1].sum() == 25 + 4
    assert [c for c, _ in objects(label, classes=[2, 3])] == [2]  # absent classes yield nothing
    with pytest.raises(ValueError):
        list(objects(label, mode="voxel"))


def stack(depth=10, side=40):
    """(Z, H, W) bool: a square object on slices 2..7, one pixel wider each slice, so each slice's box differs."""
    volume = np.zeros((depth, side, side), bool)
    for z in range(2, 8):
        volume[z, 10 : 20 + z, 12 : 22 + z] = True
    return volume


class BoxFollower:
    """A model that answers a box with the object's pixels inside it (grown by 2 pixels): a deterministic stand-in
    for SAM's box prompt, recording every call."""

    def __init__(self, volume, scores=None):
        self.volume, self.scores, self.calls, self.writes, self.previous = volume, scores, [], [], []

    def segment(self, index, box, previous):
        self.calls.append((index, box.copy()))
        self.previous.append((index, None if previous is None else int(previous.mask.sum())))
        x0, y0, x1, y1 = (int(v) for v in box)
        inside = np.zeros_like(self.volume[index])
        inside[max(y0 - 2, 0) : y1 + 3, max(x0 - 2, 0) : x1 + 3] = True
        return SliceMask(self.volume[index] & inside, None if self.scores is None else self.scores[index])

    def write(self, index, mask):
        self.writes.append((index, int(mask.sum())))


def test_propagation_from_a_volume_box_segments_its_middle_slice_then_stops_where_the_object_ends():
    volume = stack()
    model = BoxFollower(volume)
    start_box = box_from_mask(volume[4])
    written = propagate_box(model.segment, model.write, 4, start_box, 0, 9)
    assert written == [4, 5, 6, 7, 3, 2]
    # the empty slices past each end are visited (and written empty) once, nothing beyond them
    assert [i for i, _ in model.writes] == [4, 5, 6, 7, 8, 3, 2, 1]
    assert dict(model.writes)[8] == 0 and dict(model.writes)[1] == 0
    assert all(size == volume[i].sum() for i, size in model.writes)
    boxes = dict((i, b) for i, b in model.calls)
    # each direction starts from the given box; every next slice gets its neighbour's mask's box
    np.testing.assert_array_equal(boxes[4], start_box)
    np.testing.assert_array_equal(boxes[3], start_box)
    np.testing.assert_array_equal(boxes[6], box_from_mask(volume[5]))
    np.testing.assert_array_equal(boxes[2], box_from_mask(volume[3]))


def test_propagation_stays_within_its_slices():
    model = BoxFollower(stack())
    written = propagate_box(model.segment, model.write, 4, box_from_mask(stack()[4]), 3, 5)
    assert written == [4, 5, 3] and [i for i, _ in model.calls] == [4, 5, 3]


def test_propagation_from_a_drawn_slice_starts_next_to_it():
    volume = stack()
    model = BoxFollower(volume)
    written = propagate_box(model.segment, model.write, 4, box_from_mask(volume[4]), 0, 9, include_start=False)
    assert written == [5, 6, 7, 3, 2] and 4 not in [i for i, _ in model.calls]


def test_a_low_score_ends_the_direction_and_clears_that_slice():
    volume = stack()
    scores = {i: 1.0 - 0.2 * max(i - 4, 0) for i in range(10)}  # forward: 0.8 next to the start, 0.4 at slice 7
    model = BoxFollower(volume, scores)
    written = propagate_box(
        model.segment, model.write, 4, box_from_mask(volume[4]), 0, 9, include_start=False, min_score=0.5
    )
    assert written == [5, 6, 3, 2]
    assert model.writes[2] == (7, 0)  # slice 7 holds the object, but its score 0.4 ends the forward pass
    assert model.writes[-1] == (1, 0)  # backward: the object itself ends before the score does
    # without a score (a mask the user drew) the rule never applies
    unscored = BoxFollower(volume)
    assert propagate_box(
        unscored.segment, unscored.write, 4, box_from_mask(volume[4]), 0, 9, include_start=False, min_score=0.5
    ) == [5, 6, 7, 3, 2]


def test_the_guard_is_held_around_each_slices_segment_and_write():
    import threading

    lock = threading.Lock()
    volume = stack()
    held = []

    def segment(index, box, previous):
        held.append(lock.locked())
        return SliceMask(volume[index])

    def write(index, mask):
        held.append(lock.locked())

    propagate_box(segment, write, 4, box_from_mask(volume[4]), 0, 9, guard=lock)
    assert held and all(held) and not lock.locked()


def test_each_slice_is_given_its_neighbours_answer_the_start_slices_for_the_backward_pass():
    volume = stack()
    model = BoxFollower(volume)
    propagate_box(model.segment, model.write, 4, box_from_mask(volume[4]), 0, 9)
    sizes = {i: int(volume[i].sum()) for i in range(10)}
    # forward 4 (none), 5 (from 4), 6 (from 5), 7, 8; backward 3 (from the start slice 4), 2 (from 3), 1
    assert model.previous == [
        (4, None),
        (5, sizes[4]),
        (6, sizes[5]),
        (7, sizes[6]),
        (8, sizes[7]),
        (3, sizes[4]),
        (2, sizes[3]),
        (1, sizes[2]),
    ]
    drawn = BoxFollower(volume)  # from a drawn slice: both directions start from the answer given
    given = SliceMask(volume[4], 1.0)
    propagate_box(
        drawn.segment, drawn.write, 4, box_from_mask(volume[4]), 0, 9, include_start=False, start_answer=given
    )
    assert dict(drawn.previous)[5] == dict(drawn.previous)[3] == sizes[4]


def test_a_settled_slice_ends_its_direction_after_it_is_written():
    volume = stack()
    model = BoxFollower(volume)
    asked = []

    def settled(index, mask):
        asked.append(index)
        return index in (6, 3)  # the change dies out at 6 going forward and at 3 going backward

    written = propagate_box(
        model.segment, model.write, 4, box_from_mask(volume[4]), 0, 9, include_start=False, settled=settled
    )
    assert written == [5, 6, 3] and asked == [5, 6, 3]
    assert [i for i, _ in model.writes] == [5, 6, 3]  # the settled slice itself is still written


def test_a_3d_corrective_click_goes_to_the_largest_error_component_on_its_largest_slice():
    gt = np.zeros((8, 30, 30), bool)
    gt[1:7, 5:25, 5:25] = True
    pred = gt.copy()
    pred[2:4, 5:25, 5:15] = False  # a miss on slices 2-3 (2 x 200 voxels)
    pred[5, 10:20, 10:13] = False  # a smaller miss on slice 5
    index, click = corrective_click_3d(gt, pred)
    assert index == 2 and click.positive  # equal areas on 2 and 3: the first
    assert not pred[index, int(click.y), int(click.x)] and gt[index, int(click.y), int(click.x)]
    assert 5 <= click.x <= 14 and 5 <= click.y <= 24
    leak = gt.copy()
    leak[0:4, 26:30, 0:30] = True  # a false positive outside the object, 4 slices x 120 voxels: the largest
    leak[3, 26:30, 0:30] = True
    index, click = corrective_click_3d(gt, leak)
    assert not click.positive and int(click.y) >= 26 and not gt[index, int(click.y), int(click.x)]
    # along another axis: the same component, counted in planes of axis 2
    index, click = corrective_click_3d(gt, pred, axis=2)
    assert 5 <= index <= 14 and click.positive
    assert corrective_click_3d(gt, gt) is None
    with pytest.raises(ValueError, match="one \\(Z, H, W\\) shape"):
        corrective_click_3d(gt, gt[0])


def test_a_margin_grows_each_propagated_box_within_the_slice():
    volume = stack()
    model = BoxFollower(volume)
    propagate_box(model.segment, model.write, 4, box_from_mask(volume[4]), 0, 9, margin=3)
    boxes = dict(model.calls)
    expected = box_from_mask(volume[4]) + np.array([-3, -3, 3, 3])
    np.testing.assert_array_equal(boxes[5], expected)
    np.testing.assert_array_equal(grow_box(np.array([1, 2, 38, 30], np.float32), 3, (40, 40)), [0, 0, 39, 33])
    np.testing.assert_array_equal(grow_box(np.array([1, 2, 3, 4], np.float32), 0, (40, 40)), [1, 2, 3, 4])
