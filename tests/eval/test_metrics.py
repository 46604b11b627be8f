"""Metrics: hand-computed geometries, MONAI as the oracle for surface distances, empty-mask conventions, aggregation."""

import json
import math
import time
import warnings

import numpy as np
import pytest

from samadapt.eval.metrics import (
    EMPTY_MASK_CONVENTIONS,
    MetricAccumulator,
    aggregate,
    binary_metrics,
    compute_case_metrics,
    dice,
    hd95,
    image_diagonal_mm,
    iou,
    nsd,
    slice_dice,
    surface_distances,
)


def square(shape, top, left, size):
    mask = np.zeros(shape, bool)
    mask[top : top + size, left : left + size] = True
    return mask


def test_shifted_squares_dice_iou():
    gt = square((20, 20), 2, 2, 10)
    pred = square((20, 20), 2, 5, 10)  # shifted 3 columns: overlap 10 x 7
    overlap, size = 10 * 7, 100
    assert dice(pred, gt) == pytest.approx(2 * overlap / (2 * size))
    assert iou(pred, gt) == pytest.approx(overlap / (2 * size - overlap))
    assert dice(gt, gt) == 1.0 and iou(gt, gt) == 1.0


def test_dice_iou_accept_0_1_integers_and_reject_label_maps():
    gt = square((8, 8), 0, 0, 4)
    assert dice(gt.astype(np.uint8), gt.astype(np.float32)) == 1.0
    with pytest.raises(ValueError, match="binary"):
        dice(gt * 2, gt)  # a label map would binarise silently
    with pytest.raises(ValueError, match="binary"):
        iou(gt * 0.7, gt)  # probabilities must be thresholded first
    with pytest.raises(ValueError, match="shapes"):
        dice(gt, gt[:4])


def plates_3d(offset: int, shape=(16, 12, 12)):
    """One-voxel-thick plates at z = 3 (GT) and z = 3 + offset (prediction): every surface distance is offset * sz."""
    gt, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    gt[3, 2:10, 2:10] = True
    pred[3 + offset, 2:10, 2:10] = True
    return pred, gt


@pytest.mark.parametrize("offset", [1, 2, 4])
def test_hd95_is_in_mm_along_anisotropic_z(offset):
    pred, gt = plates_3d(offset)
    assert hd95(pred, gt, (2.5, 0.7, 0.7)) == pytest.approx(offset * 2.5)
    # the same offset along x uses the x spacing: the axis order of `spacing` is honoured
    assert hd95(pred.transpose(2, 1, 0), gt.transpose(2, 1, 0), (0.7, 0.7, 2.5)) == pytest.approx(offset * 2.5)
    assert hd95(pred, gt, (0.7, 2.5, 2.5)) == pytest.approx(offset * 0.7)


def test_hd95_of_solid_cubes_shifted_along_z():
    gt = np.zeros((20, 30, 30), bool)
    gt[5:10, 10:20, 10:20] = True
    pred = np.roll(gt, 3, axis=0)  # 3 slices deeper: the caps are 3 * 2.5 mm apart, the sides touch
    assert hd95(pred, gt, (2.5, 0.7, 0.7)) == pytest.approx(7.5)
    assert hd95(pred, gt, (1.0, 0.7, 0.7)) == pytest.approx(3.0)


def test_hd95_2d_lines_and_isotropic_scalar_spacing():
    gt, pred = np.zeros((10, 12), bool), np.zeros((10, 12), bool)
    gt[2, 1:11] = True
    pred[5, 1:11] = True  # 3 rows apart
    assert hd95(pred, gt, (1.5, 0.4)) == pytest.approx(3 * 1.5)
    assert hd95(pred, gt, 2.0) == pytest.approx(3 * 2.0)
    a, b = square((30, 30), 5, 5, 10), square((30, 30), 5, 9, 10)  # squares 4 columns apart, 0.5 mm pixels
    assert hd95(a, b, (0.5, 0.5)) == pytest.approx(2.0)


def test_nsd_tolerance_below_and_above_the_offset():
    pred, gt = plates_3d(2)  # every distance is 2 * 2.5 = 5 mm
    spacing = (2.5, 0.7, 0.7)
    assert nsd(pred, gt, spacing, tolerance_mm=4.9) == 0.0
    assert nsd(pred, gt, spacing, tolerance_mm=5.0) == 1.0  # the tolerance is inclusive
    assert nsd(pred, gt, spacing, tolerance_mm=7.0) == 1.0
    assert nsd(gt, gt, spacing, tolerance_mm=0.0) == 1.0


def test_known_fraction_with_a_far_false_positive():
    """Prediction = the GT plate + a copy 8 slices (20 mm) away: 100 of 300 surface voxels are 20 mm off."""
    gt = np.zeros((12, 12, 12), bool)
    gt[1, 1:11, 1:11] = True
    pred = gt.copy()
    pred[9, 1:11, 1:11] = True
    result = binary_metrics(pred, gt, (2.5, 1.0, 1.0), tolerance_mm=2.0)
    assert result["dice"] == pytest.approx(2 * 100 / 300)
    assert result["iou"] == pytest.approx(100 / 200)
    assert result["nsd"] == pytest.approx(200 / 300)
    assert result["hd95_mm"] == pytest.approx(20.0)  # half of the prediction's surface is 20 mm away
    to_gt, to_pred = surface_distances(pred, gt, (2.5, 1.0, 1.0))
    assert sorted(set(to_gt.tolist())) == [0.0, 20.0] and not to_pred.any()


def blob(shape, centre, radii, seed):
    """An irregular ellipsoid (or ellipse): a wobbly boundary, some parts touching nothing."""
    rng = np.random.default_rng(seed)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True))
    return r2 < 1 + 0.3 * rng.random(shape)


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((40, 48), (0.8, 1.3)), ((14, 30, 26), (3.0, 0.9, 0.75))],
)
def test_surface_metrics_match_monai(shape, spacing):
    monai_metrics = pytest.importorskip("monai.metrics")
    torch = pytest.importorskip("torch")
    centre = [n / 2 for n in shape]
    gt = blob(shape, centre, [n / 3.5 for n in shape], seed=0)
    pred = blob(shape, [c + 2 for c in centre], [n / 4 for n in shape], seed=1)
    pred[0, 0] = True  # a stray voxel in a corner, on the image border
    y_pred, y = (torch.from_numpy(m)[None, None] for m in (pred, gt))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected_hd = monai_metrics.compute_hausdorff_distance(y_pred, y, percentile=95, spacing=spacing).item()
        expected_nsd = monai_metrics.compute_surface_dice(
            y_pred, y, class_thresholds=[1.5], include_background=True, spacing=spacing
        ).item()
    ours = binary_metrics(pred, gt, spacing, tolerance_mm=1.5)
    assert ours["hd95_mm"] == pytest.approx(expected_hd, rel=1e-5)
    assert ours["nsd"] == pytest.approx(expected_nsd, rel=1e-5)
    assert 0 < ours["nsd"] < 1 and ours["hd95_mm"] > max(spacing)  # a non-trivial case


def test_empty_mask_conventions():
    empty = np.zeros((4, 6, 8), bool)
    some = empty.copy()
    some[1, 2:4, 3:5] = True
    spacing = (3.0, 1.0, 0.5)
    both = binary_metrics(empty, empty, spacing)
    assert all(math.isnan(v) for v in both.values())
    diagonal = math.sqrt((4 * 3.0) ** 2 + (6 * 1.0) ** 2 + (8 * 0.5) ** 2)
    assert image_diagonal_mm(empty.shape, spacing) == pytest.approx(diagonal)
    for pred, gt in ((some, empty), (empty, some)):  # hallucinated, missed
        one = binary_metrics(pred, gt, spacing)
        assert one == {"dice": 0.0, "iou": 0.0, "hd95_mm": pytest.approx(diagonal), "nsd": 0.0}
        assert hd95(pred, gt, spacing) == pytest.approx(diagonal) and nsd(pred, gt, spacing) == 0.0
    assert math.isnan(dice(empty, empty)) and math.isnan(iou(empty, empty)) and math.isnan(hd95(empty, empty, 1.0))
    assert "NaN" in EMPTY_MASK_CONVENTIONS and "diagonal" in EMPTY_MASK_CONVENTIONS


def test_invalid_spacing_and_tolerance():
    pred, gt = plates_3d(1)
    with pytest.raises(ValueError, match="spacing"):
        hd95(pred, gt, (1.0, 1.0))  # 3D masks need 3 spacings
    with pytest.raises(ValueError, match="spacing"):
        hd95(pred, gt, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        nsd(pred, gt, 1.0, tolerance_mm=-1.0)
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(pred, np.zeros_like(gt), 1.0)


def test_compute_case_metrics_on_label_maps():
    gt = np.zeros((3, 10, 10), np.uint8)
    gt[1, 2:6, 2:6] = 1
    pred = gt.copy()
    pred[1, 2:6, 6:8] = 2  # class 2 only in the prediction, class 3 nowhere
    result = compute_case_metrics(pred, gt, {1: "liver", 2: "tumour", 3: "vessel"}, (2.0, 1.0, 1.0))
    assert list(result) == ["liver", "tumour", "vessel"]
    assert result["liver"]["dice"] == 1.0 and result["liver"]["hd95_mm"] == 0.0
    assert result["tumour"]["dice"] == 0.0 and result["tumour"]["hd95_mm"] == pytest.approx(math.sqrt(36 + 200))
    assert all(math.isnan(v) for v in result["vessel"].values())
    with pytest.raises(ValueError, match="integer"):
        compute_case_metrics(pred.astype(float), gt, {1: "liver"}, 1.0)
    with pytest.raises(ValueError, match="unique"):
        compute_case_metrics(pred, gt, {1: "a", 2: "a"}, 1.0)


def test_aggregate_skips_nan_and_counts():
    def case(liver, tumour):
        return {
            name: dict(zip(("dice", "iou", "hd95_mm", "nsd"), v, strict=True))
            for name, v in zip(("liver", "tumour"), (liver, tumour), strict=True)
        }

    nan = math.nan
    cases = [
        case((0.9, 0.8, 2.0, 1.0), (nan, nan, nan, nan)),  # tumour absent in both: excluded
        case((0.7, 0.6, 4.0, 0.5), (0.0, 0.0, 300.0, 0.0)),  # tumour missed: worst case, counted
        case((0.8, 0.7, 3.0, 0.75), (0.6, 0.5, 10.0, 0.5)),
    ]
    summary = aggregate(cases)
    liver, tumour = summary["per_class"]["liver"], summary["per_class"]["tumour"]
    assert liver["dice"] == pytest.approx(0.8) and liver["hd95_mm"] == pytest.approx(3.0)
    assert liver["cases"] == 3 and liver["excluded"] == 0
    assert tumour["dice"] == pytest.approx(0.3) and tumour["hd95_mm"] == pytest.approx(155.0)
    assert tumour["cases"] == 2 and tumour["excluded"] == 1 and tumour["counts"]["hd95_mm"] == 2
    assert summary["mean_dice"] == pytest.approx((0.8 + 0.3) / 2)
    assert summary["cases"] == 3

    # flat rows (metrics.csv) give the same numbers; a requested class without rows is NaN with zero counts
    rows = [{"case": f"c{i}", "class": name, **values} for i, case in enumerate(cases) for name, values in case.items()]
    flat = aggregate(rows, class_names=["tumour", "liver", "spleen"])
    assert list(flat["per_class"]) == ["tumour", "liver", "spleen"]
    assert flat["per_class"]["tumour"]["dice"] == pytest.approx(0.3) and flat["cases"] == 3
    assert math.isnan(flat["per_class"]["spleen"]["dice"]) and flat["per_class"]["spleen"]["cases"] == 0
    assert flat["mean_dice"] == pytest.approx(summary["mean_dice"])  # the empty class does not drag the mean


def test_metric_accumulator():
    acc = MetricAccumulator(class_names=["liver"])
    gt = square((12, 12), 2, 2, 6)
    for z, shift in enumerate((0, 2)):
        pred_labels = np.roll(gt, shift, 1).astype(int)
        acc.add("case0", compute_case_metrics(pred_labels, gt.astype(int), {1: "liver"}, 1.0), slice=z)
    acc.add("case1", {"liver": binary_metrics(gt, gt, 1.0)}, slice=0)
    with pytest.raises(ValueError, match="already"):
        acc.add("case1", {"liver": binary_metrics(gt, gt, 1.0)}, slice=0)
    assert len(acc) == 3
    units = [(r["case"], r["slice"], r["class"]) for r in acc.rows]
    assert units == [("case0", 0, "liver"), ("case0", 1, "liver"), ("case1", 0, "liver")]
    summary = acc.aggregate()
    assert summary["cases"] == 3
    assert summary["per_class"]["liver"]["dice"] == pytest.approx((1 + 2 * 24 / 72 + 1) / 3)
    json.dumps(summary)  # plain floats and ints only
    acc.reset()
    assert len(acc) == 0 and acc.rows == []


def test_hd95_is_fast_on_a_large_volume_with_scattered_false_positives():
    """512 x 512 x 100 with far-apart false positives: the bounding box is the whole image, the surfaces are small."""
    shape = (100, 512, 512)
    grids = np.ogrid[: shape[0], : shape[1], : shape[2]]
    gt = ((grids[0] - 50) / 12) ** 2 + ((grids[1] - 250) / 40) ** 2 + ((grids[2] - 260) / 45) ** 2 < 1
    pred = np.roll(gt, 2, axis=2)
    pred[0, 0, 0] = pred[99, 511, 511] = True
    start = time.perf_counter()
    value = hd95(pred, gt, (2.5, 0.8, 0.8))
    elapsed = time.perf_counter() - start
    assert value == pytest.approx(1.6, abs=0.2)
    assert elapsed < 3.0, f"hd95 took {elapsed:.2f} s"


def test_slice_dice_scores_one_class_of_a_slice_result():
    from samadapt.eval.evaluate import SliceResult

    gt = np.zeros((4, 4), np.int16)
    gt[0, :2] = 1  # class 1: 2 pixels
    gt[3, 3] = 2  # class 2: 1 pixel, not predicted
    pred = {1: np.zeros((4, 4), bool), 2: np.zeros((4, 4), bool), 3: np.zeros((4, 4), bool)}
    pred[1][0, 1:4] = True  # 3 pixels, 1 of them right: 2 * 1 / (3 + 2)
    result = SliceResult("case", 0, np.zeros((4, 4)), gt, pred)
    assert slice_dice(result, 1) == pytest.approx(0.4)
    assert slice_dice(result, 2) == 0.0
    assert math.isnan(slice_dice(result, 3))  # absent and not predicted
