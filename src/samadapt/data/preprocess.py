"""Intensity presets that bring a modality to [0, 1] floats.

| preset | what | applied to |
|---|---|---|
| ``ct_synapse`` | clip HU to [-125, 275] (SAMed's Synapse protocol), scale to [0, 1] | volume |
| ``ct_abdomen`` | window W400 / L40 | volume |
| ``ct_lung`` | window W1500 / L-600 | volume |
| ``mr`` | clip to the 0.5 / 99.5 percentiles of the volume, min-max | volume |
| ``percentile_slice`` | the same percentiles per slice (LiteMedSAM's evaluation habit; mixed-modality sets) | slice |
| ``minmax`` | min-max | volume |
| ``rgb`` | 8-bit colour / 255 | volume |

A constant image maps to zeros, never to a division by zero.
"""

from __future__ import annotations

import numpy as np

CT_WINDOWS = {"ct_synapse": (-125.0, 275.0), "ct_abdomen": (-160.0, 240.0), "ct_lung": (-1350.0, 150.0)}
PRESETS = (*CT_WINDOWS, "mr", "percentile_slice", "minmax", "rgb")
SLICE_WISE = ("percentile_slice",)


def window(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] and scale to [0, 1]."""
    if high <= low:
        raise ValueError(f"window needs high > low, got [{low}, {high}]")
    return ((np.clip(array.astype(np.float32), low, high) - low) / (high - low)).astype(np.float32)


def ct_window(array: np.ndarray, level: float, width: float) -> np.ndarray:
    """A CT window given as level / width in HU."""
    return window(array, level - width / 2, level + width / 2)


def minmax(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    if high - low < 1e-8:
        return np.zeros_like(array)
    return (array - low) / (high - low)


def percentile_clip(array: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip to the given percentiles (of the non-constant image), then min-max."""
    lo, hi = np.percentile(array, [low, high])
    if hi - lo < 1e-8:
        return minmax(array)
    return window(array, float(lo), float(hi))


def normalize(array: np.ndarray, preset: str) -> np.ndarray:
    """Apply a preset to a volume (or a slice, for slice-wise presets) -> float32 in [0, 1]."""
    if preset in CT_WINDOWS:
        return window(array, *CT_WINDOWS[preset])
    if preset in ("mr", "percentile_slice"):
        return percentile_clip(array)
    if preset == "minmax":
        return minmax(array)
    if preset == "rgb":
        return (array.astype(np.float32) / 255.0) if array.dtype == np.uint8 else minmax(array)
    raise ValueError(f"unknown preprocessing preset {preset!r}; choose one of {', '.join(PRESETS)}")


def preset_for_modality(modality: str) -> str:
    """The default preset of a dataset.json modality name."""
    name = modality.strip().lower()
    if name in ("ct", "computed tomography"):
        return "ct_abdomen"
    if name in ("rgb", "dermoscopy", "fundus", "endoscopy", "photo"):
        return "rgb"
    return "mr"
