"""Intensities in [0, 1]: the min-max rule, the raw-image rule, and the check that a slice was preprocessed.

numpy only (no torch), so the torch-free ONNX runtime (``samadapt.export.runtime``) shares these rules with training
and ``samadapt.transforms`` instead of copying them.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-8
# preprocessed slices may overshoot [0, 1] by rounding only; anything further is an image that skipped its preset
UNIT_TOLERANCE = 1e-3


def finite(array: np.ndarray) -> np.ndarray:
    """float32, with NaN / -inf replaced by the lowest finite value and +inf by the highest."""
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        values = array[np.isfinite(array)]
        low = float(values.min()) if values.size else 0.0
        array = np.nan_to_num(array, nan=low, posinf=float(values.max()) if values.size else 0.0, neginf=low)
    return array


def minmax(array: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant image gives zeros."""
    array = finite(array)
    if array.size == 0:
        return array
    low, high = float(array.min()), float(array.max())
    if high - low < _EPS:
        return np.zeros_like(array)
    return (array - low) / (high - low)


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """A raw (H, W) or (H, W, 3) image as float32 in [0, 1]: uint8 / 255, anything else min-max (constant -> 0)."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return minmax(image)


def check_unit_range(image: np.ndarray) -> None:
    """Refuse a slice said to be preprocessed that is not in [0, 1] (it skipped its dataset's preset).

    Raises:
        ValueError: with the slice's range.
    """
    if image.size and (float(image.min()) < -UNIT_TOLERANCE or float(image.max()) > 1 + UNIT_TOLERANCE):
        raise ValueError(
            f"a preprocessed slice must lie in [0, 1], this one spans [{float(image.min()):.4g}, "
            f"{float(image.max()):.4g}]: apply a preprocessing preset first (samadapt.data.preprocess)"
        )
