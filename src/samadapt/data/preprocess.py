"""Intensity presets that bring a modality to [0, 1] floats.

| preset | what | applied to |
|---|---|---|
| ``ct_synapse`` | clip HU to [-125, 275] (SAMed's Synapse protocol), scale to [0, 1] | volume |
| ``ct_abdomen`` | window W400 / L40, i.e. [-160, 240] HU | volume |
| ``ct_lung`` | window W1500 / L-600, i.e. [-1350, 150] HU | volume |
| ``mr`` | clip to the 0.5 / 99.5 percentiles of the whole volume, min-max | volume |
| ``percentile_slice`` | the same percentiles per slice (LiteMedSAM's evaluation habit; mixed-modality sets) | slice |
| ``minmax`` | min-max | volume |
| ``rgb`` | 8-bit colour / 255 (other types: min-max) | volume |

Volume-wise presets are applied once per volume, so that neighbouring slices keep comparable intensities and a slice
with little tissue is not stretched into noise. NaNs become the lowest finite value. A constant image maps to zeros,
never to a division by zero.
"""

from __future__ import annotations

import numpy as np

from samadapt.errors import ConfigError
from samadapt.intensity import finite, minmax

CT_WINDOWS = {"ct_synapse": (-125.0, 275.0), "ct_abdomen": (-160.0, 240.0), "ct_lung": (-1350.0, 150.0)}
PRESETS = (*CT_WINDOWS, "mr", "percentile_slice", "minmax", "rgb")
SLICE_WISE = ("percentile_slice",)
_EPS = 1e-8


def window(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] and scale to [0, 1] (float32)."""
    if high <= low:
        raise ConfigError(f"window needs high > low, got [{low}, {high}]")
    return ((np.clip(finite(array), low, high) - low) / (high - low)).astype(np.float32)


def ct_window(array: np.ndarray, level: float, width: float) -> np.ndarray:
    """A CT window given as level / width in HU: [level - width / 2, level + width / 2] -> [0, 1]."""
    return window(array, level - width / 2, level + width / 2)


def percentile_clip(array: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip to the ``low`` / ``high`` percentiles, then scale to [0, 1] (plain min-max when they coincide)."""
    array = finite(array)
    if array.size == 0:
        return array
    lo, hi = np.percentile(array, [low, high])
    if hi - lo < _EPS:
        return minmax(array)
    return window(array, float(lo), float(hi))


def normalize(array: np.ndarray, preset: str) -> np.ndarray:
    """Apply a preset to a volume (or to one slice, for the slice-wise presets) -> float32 in [0, 1].

    Raises:
        ValueError: an unknown preset name.
    """
    if preset in CT_WINDOWS:
        return window(array, *CT_WINDOWS[preset])
    if preset in ("mr", "percentile_slice"):
        return percentile_clip(array)
    if preset == "minmax":
        return minmax(array)
    if preset == "rgb":
        return (np.asarray(array, np.float32) / 255.0) if array.dtype == np.uint8 else minmax(array)
    raise ConfigError(f"unknown preprocessing preset {preset!r}; choose one of {', '.join(PRESETS)}")


def preprocess_volume(array: np.ndarray, preset: str) -> np.ndarray:
    """The volume-wise part of a preset (slice-wise presets leave the volume as it is, for ``volume_slice``)."""
    return np.asarray(array) if preset in SLICE_WISE else normalize(array, preset)


def volume_slice(volume: np.ndarray, index: int, axis: int, preset: str) -> np.ndarray:
    """Slice ``index`` along ``axis`` of a ``preprocess_volume`` result, with the slice-wise part of the preset:
    float32 (H, W) or (H, W, 3) in [0, 1]. Training, evaluation and prediction all take their slices from here."""
    plane = np.take(volume, index, axis=axis)
    if preset in SLICE_WISE:
        plane = normalize(plane, preset)
    return np.ascontiguousarray(plane, dtype=np.float32)


_BY_MODALITY = {
    "ct": "ct_abdomen",
    "computed tomography": "ct_abdomen",
    "rgb": "rgb",
    "dermoscopy": "rgb",
    "fundus": "rgb",
    "endoscopy": "rgb",
    "photo": "rgb",
    # nnU-Net v2 channel names that name a normalisation scheme
    "rgb_to_0_1": "rgb",
    "rescale_to_0_1": "minmax",
    "nonorm": "minmax",
}


def preset_for_modality(modality: str) -> str:
    """The default preset of a dataset.json modality / channel name: CT -> ``ct_abdomen``, colour -> ``rgb``,
    anything else (MRI, T1, FLAIR, ultrasound, ...) -> ``mr``."""
    return _BY_MODALITY.get(modality.strip().lower(), "mr")
