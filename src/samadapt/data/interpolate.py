"""Shape-based interpolation of label slices: the "fill between slices" of 3D Slicer and ITK-SNAP.

A user who labelled a few slices of a volume already has this without any model, so every few-slice method is
measured against it (``bench/accuracy.py``). Each class's mask on the two labelled slices that bracket a slice is
turned into a signed distance map (negative inside, in mm), the two maps are blended linearly by where the slice lies
between them, and the class is where the blend is negative (Raya and Udupa, IEEE TMI 1990; Herman et al. 1992).
Where several classes claim a pixel, the deepest (most negative blend) wins. Slices outside the labelled range get
nothing: there is no second slice to blend with. numpy / scipy only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from samadapt.errors import DataError


def signed_distance(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """Signed Euclidean distance to the mask's boundary, in mm: negative inside, positive outside.

    An empty mask is "far away everywhere": the image diagonal, so that a shape blended towards an empty slice shrinks
    and vanishes part of the way there instead of staying whole.
    """
    mask = np.asarray(mask, bool)
    spacing = tuple(float(s) for s in spacing)
    if not mask.any():
        return np.full(mask.shape, float(np.hypot(*(n * s for n, s in zip(mask.shape, spacing, strict=True)))))
    if mask.all():
        return np.full(mask.shape, -1.0)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)  # distance of outside pixels to the mask
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)  # distance of inside pixels to the background
    # half a pixel either way puts the boundary between the last inside and the first outside pixel
    return np.where(mask, 0.5 - inside, outside - 0.5)


def interpolate_labels(
    lower: np.ndarray,
    upper: np.ndarray,
    fraction: float,
    classes: Sequence[int],
    spacing: Sequence[float] = (1.0, 1.0),
) -> np.ndarray:
    """The label slice a ``fraction`` of the way from ``lower`` (0) to ``upper`` (1): per class, the blend of the two
    signed distance maps is negative; overlaps go to the class with the most negative blend.

    Raises:
        DataError: the two label slices differ in shape, or ``fraction`` lies outside [0, 1].
    """
    if lower.shape != upper.shape:
        raise DataError(f"label slices to interpolate differ in shape: {lower.shape} and {upper.shape}")
    if not 0.0 <= fraction <= 1.0:
        raise DataError(f"the interpolation fraction must lie in [0, 1], got {fraction}")
    out = np.zeros(lower.shape, lower.dtype)
    depth = np.zeros(lower.shape)  # the winning class's blended distance (negative where a class claims the pixel)
    for class_id in classes:
        a, b = lower == class_id, upper == class_id
        if not (a.any() or b.any()):
            continue
        blend = (1.0 - fraction) * signed_distance(a, spacing) + fraction * signed_distance(b, spacing)
        wins = blend < depth
        out[wins] = class_id
        depth[wins] = blend[wins]
    return out


def interpolate_slice(
    labelled: Mapping[int, np.ndarray], index: int, classes: Sequence[int], spacing: Sequence[float] = (1.0, 1.0)
) -> np.ndarray:
    """The label of slice ``index`` from the labelled slices ``{slice index: label slice}``: the labelled slice
    itself when given, the interpolation between the two that bracket it, else (outside their range) empty.

    Raises:
        DataError: no labelled slice is given.
    """
    if not labelled:
        raise DataError("shape-based interpolation needs at least one labelled slice")
    if index in labelled:
        return labelled[index].copy()
    below = [z for z in labelled if z < index]
    above = [z for z in labelled if z > index]
    template = next(iter(labelled.values()))
    if not below or not above:
        return np.zeros_like(template)
    z0, z1 = max(below), min(above)
    return interpolate_labels(labelled[z0], labelled[z1], (index - z0) / (z1 - z0), classes, spacing)


def fill_between_slices(
    labelled: Mapping[int, np.ndarray], depth: int, classes: Sequence[int], spacing: Sequence[float] = (1.0, 1.0)
) -> np.ndarray:
    """A (depth, H, W) label volume from a few labelled slices: those kept exactly, the slices between them
    interpolated, the rest empty. ``spacing`` is the in-plane (row, column) spacing in mm.

    Raises:
        DataError: no labelled slice, or one outside [0, depth).
    """
    outside = [z for z in labelled if not 0 <= z < depth]
    if outside:
        raise DataError(f"labelled slices {outside} lie outside a volume of {depth} slices")
    template = next(iter(labelled.values()), None)
    if template is None:
        raise DataError("shape-based interpolation needs at least one labelled slice")
    volume = np.zeros((depth, *template.shape), template.dtype)
    for z in range(depth):
        volume[z] = interpolate_slice(labelled, z, classes, spacing)
    return volume
