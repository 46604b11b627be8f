"""Shape-based interpolation between labelled slices: hand-built discs with known radii."""

import numpy as np
import pytest

from samadapt.data.interpolate import fill_between_slices, interpolate_labels, interpolate_slice, signed_distance
from samadapt.errors import DataError


def disc(radius: float, centre=(32, 32), shape=(64, 64)) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def test_signed_distance_is_negative_inside_positive_outside_in_mm():
    mask = disc(10)
    distance = signed_distance(mask, spacing=(2.0, 2.0))
    assert (distance[mask] < 0).all() and (distance[~mask] > 0).all()
    # the centre lies 10 pixels = 20 mm from the edge (within the half-pixel boundary convention)
    assert distance[32, 32] == pytest.approx(-20.0, abs=2.0)
    assert distance[32, 2] == pytest.approx(2 * 20 - 0.5 * 2, abs=2.5)  # 20 pixels outside the disc's edge


def test_halfway_between_two_discs_is_the_disc_of_the_mean_radius():
    lower, upper = disc(8).astype(np.uint8), disc(16).astype(np.uint8)
    middle = interpolate_labels(lower, upper, 0.5, [1])
    radius = np.sqrt(middle.sum() / np.pi)
    assert radius == pytest.approx(12.0, abs=0.5)
    # the ends of the blend are the labelled slices themselves
    assert (interpolate_labels(lower, upper, 0.0, [1]) == lower).all()
    assert (interpolate_labels(lower, upper, 1.0, [1]) == upper).all()


def test_a_shape_blended_towards_an_empty_slice_shrinks_and_vanishes():
    lower, upper = disc(12).astype(np.uint8), np.zeros((64, 64), np.uint8)
    areas = [interpolate_labels(lower, upper, t, [1]).sum() for t in (0.0, 0.02, 0.5, 0.9)]
    assert areas[0] > areas[1] > 0 and areas[2] == 0 and areas[3] == 0


def test_overlapping_classes_go_to_the_deepest():
    lower = np.zeros((64, 64), np.uint8)
    lower[disc(10, centre=(32, 20))] = 1
    lower[disc(10, centre=(32, 44))] = 2
    out = interpolate_labels(lower, lower, 0.5, [1, 2])
    assert (out == lower).all()


def test_fill_keeps_labelled_slices_exactly_and_leaves_the_outside_empty():
    labelled = {2: disc(6).astype(np.uint8) * 3, 6: disc(14).astype(np.uint8) * 3}
    labelled[6][0, 0] = 3  # a stray pixel: kept bit for bit on its own slice
    volume = fill_between_slices(labelled, 9, [3], spacing=(1.0, 1.0))
    assert (volume[2] == labelled[2]).all() and (volume[6] == labelled[6]).all()
    assert volume[0].sum() == 0 and volume[1].sum() == 0 and volume[7].sum() == 0 and volume[8].sum() == 0
    areas = [int((volume[z] == 3).sum()) for z in range(2, 7)]
    assert areas == sorted(areas)  # grows from the small disc to the large one
    assert (interpolate_slice(labelled, 4, [3]) == volume[4]).all()


def test_bad_input_is_refused_with_a_message():
    with pytest.raises(DataError, match="at least one labelled slice"):
        interpolate_slice({}, 3, [1])
    with pytest.raises(DataError, match="outside a volume of 4 slices"):
        fill_between_slices({5: np.zeros((4, 4), np.uint8)}, 4, [1])
    with pytest.raises(DataError, match="differ in shape"):
        interpolate_labels(np.zeros((4, 4)), np.zeros((5, 4)), 0.5, [1])
