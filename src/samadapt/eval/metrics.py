"""Segmentation metrics on binary masks, in physical units: Dice, IoU, HD95 (mm) and NSD (normalised surface Dice).

Masks are numpy arrays of any dimension (2D slices (H, W), volumes (Z, Y, X)) with ``spacing`` in mm in the same axis
order. Surface distances use Euclidean distance transforms with that spacing, on the bounding box of both masks.

Empty-mask conventions (stated in every report, see ``EMPTY_MASK_CONVENTIONS``):
- ground truth and prediction both empty: every metric is NaN and left out of means (nothing to segment, nothing
  to score; counting it as a perfect 1 would inflate means on slices without the target);
- one of them empty: Dice = IoU = NSD = 0, and HD95 = the diagonal of the image in mm (the worst possible distance),
  so a missed or hallucinated object is penalised rather than dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

EMPTY_MASK_CONVENTIONS = (
    "Both ground truth and prediction empty: metrics are NaN and excluded from means. "
    "Exactly one empty: Dice = IoU = NSD = 0 and HD95 = the image diagonal in mm (worst case)."
)
METRICS = ("dice", "iou", "hd95_mm", "nsd")


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2 |P & G| / (|P| + |G|); NaN when both are empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    total = int(pred.sum()) + int(gt.sum())
    return math.nan if total == 0 else 2.0 * int(np.logical_and(pred, gt).sum()) / total


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """|P & G| / |P | G|; NaN when both are empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    union = int(np.logical_or(pred, gt).sum())
    return math.nan if union == 0 else int(np.logical_and(pred, gt).sum()) / union


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask that touch the background (full connectivity)."""
    eroded = ndimage.binary_erosion(mask, structure=np.ones((3,) * mask.ndim), border_value=0)
    return mask & ~eroded


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each prediction surface voxel to the ground-truth surface, and the reverse."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    both = pred | gt
    # crop to the bounding box of both masks plus a margin: distance transforms then cost what the objects cost
    lo = [max(int(idx.min()) - 2, 0) for idx in np.nonzero(both)]
    hi = [int(idx.max()) + 3 for idx in np.nonzero(both)]
    window = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    pred_surface, gt_surface = _surface(pred[window]), _surface(gt[window])
    to_gt = ndimage.distance_transform_edt(~gt_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return to_gt[pred_surface], to_pred[gt_surface]


def _diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile of the symmetric surface distances, in mm (conventions for empty masks above)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if not pred.any() and not gt.any():
        return math.nan
    if not pred.any() or not gt.any():
        return _diagonal_mm(gt.shape, spacing)
    a, b = surface_distances(pred, gt, spacing)
    return float(np.percentile(np.concatenate([a, b]), 95))


def nsd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0) -> float:
    """Normalised surface Dice: the fraction of both surfaces within ``tolerance_mm`` of the other."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if not pred.any() and not gt.any():
        return math.nan
    if not pred.any() or not gt.any():
        return 0.0
    a, b = surface_distances(pred, gt, spacing)
    return float(((a <= tolerance_mm).sum() + (b <= tolerance_mm).sum()) / (len(a) + len(b)))


def binary_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0) -> dict:
    """All four metrics of one binary mask pair."""
    return {
        "dice": dice(pred, gt),
        "iou": iou(pred, gt),
        "hd95_mm": hd95(pred, gt, spacing),
        "nsd": nsd(pred, gt, spacing, tolerance_mm),
    }


def nanmean(values: Sequence[float]) -> float:
    """Mean over finite values; NaN when there are none."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def aggregate(rows: Sequence[dict], class_names: Sequence[str]) -> dict:
    """Per-class means over cases (NaN excluded, with counts), and the mean Dice over classes.

    ``rows`` hold ``case``, ``class`` and the metric keys (one row per case and class).
    """
    per_class = {}
    for name in class_names:
        mine = [r for r in rows if r["class"] == name]
        per_class[name] = {m: nanmean([r[m] for r in mine]) for m in METRICS}
        per_class[name]["cases"] = sum(1 for r in mine if not math.isnan(r["dice"]))
    return {
        "mean_dice": nanmean([v["dice"] for v in per_class.values()]),
        "mean_hd95_mm": nanmean([v["hd95_mm"] for v in per_class.values()]),
        "per_class": per_class,
    }
