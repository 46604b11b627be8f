"""Training augmentation for medical slices: intensity (scale, shift, gamma, noise) and a small affine.

Works on a slice already on the model-input grid: image (3, S, S) float in [0, 1] (0 in the padding), label (S, S)
integers. Every random number comes from the numpy ``Generator`` passed in, so a run stays reproducible from its seed
and resumable from the generator's state. The geometric part is MONAI's ``Affine`` with the parameters drawn here, the
same matrix for image (bilinear) and label (nearest neighbour), so the two stay aligned; intensity changes touch the
image only. Meant for few-label training, where a handful of exemplars must stand for scanners, contrasts and
positions they do not show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import Affine


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of each change (each applied independently with its probability).

    Attributes:
        p_affine: probability of the affine; ``rotate_deg`` (+-), ``scale`` (+- relative), ``translate`` (+- share of
            the side) its ranges. Pixels moved in from outside are 0 (padding), label 0.
        p_scale / scale_range: multiply intensities by a factor in [1 - r, 1 + r].
        p_shift / shift_range: add an offset in [-r, r] to the non-zero pixels (the zero padding stays 0).
        p_gamma / gamma_range: raise intensities to a power in [lo, hi] (contrast change; 0 and 1 are fixed).
        p_noise / noise_std: add Gaussian noise of standard deviation up to ``noise_std`` to the non-zero pixels.
    The result is clipped to [0, 1].
    """

    p_affine: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    translate: float = 0.05
    p_scale: float = 0.5
    scale_range: float = 0.1
    p_shift: float = 0.5
    shift_range: float = 0.1
    p_gamma: float = 0.5
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.3
    noise_std: float = 0.03


def augment(
    image: torch.Tensor, label: np.ndarray, rng: np.random.Generator, config: AugmentConfig = AugmentConfig()
) -> tuple[torch.Tensor, np.ndarray]:
    """A random intensity and geometric change of one training slice, aligned between image and label.

    Args:
        image: (3, S, S) float tensor in [0, 1].
        label: (S, S) integer label map on the same grid.
        rng: the run's generator; the same generator state gives the same result.
        config: probabilities and ranges.

    Returns:
        (image (3, S, S) float32 in [0, 1], label (S, S) int64, C-contiguous); the inputs are not modified.
    """
    if image.dim() != 3 or tuple(image.shape[-2:]) != tuple(label.shape):
        raise ValueError(
            f"augment needs image (C, S, S) and label (S, S) on one grid, got {image.shape} / {label.shape}"
        )
    image = image.detach().to(torch.float32).clone()
    label = np.asarray(label)
    # draw every parameter first, in a fixed order, so the stream does not depend on which changes apply
    draws = rng.random(5)
    rotate = math.radians(rng.uniform(-config.rotate_deg, config.rotate_deg))
    zoom = rng.uniform(1 - config.scale, 1 + config.scale)
    shift_xy = rng.uniform(-config.translate, config.translate, size=2) * np.array(label.shape[::-1])
    factor = rng.uniform(1 - config.scale_range, 1 + config.scale_range)
    offset = rng.uniform(-config.shift_range, config.shift_range)
    gamma = rng.uniform(*config.gamma_range)
    sigma = rng.uniform(0, config.noise_std)
    noise_seed = int(rng.integers(2**31))

    if draws[0] < config.p_affine:
        # MONAI's translate_params follow the array axes: (row, column)
        transform = Affine(
            rotate_params=rotate,
            scale_params=(zoom, zoom),
            translate_params=(float(shift_xy[1]), float(shift_xy[0])),
            padding_mode="zeros",
            image_only=True,
        )
        image = _plain(transform(image, mode="bilinear")).float()
        moved = transform(torch.from_numpy(label.astype(np.float32))[None], mode="nearest")
        label = _plain(moved)[0].round().numpy()
    inside = image > 0
    if draws[1] < config.p_scale:
        image = image * factor
    if draws[2] < config.p_shift:
        image = torch.where(inside, image + offset, image)
    image = image.clamp(0, 1)
    if draws[3] < config.p_gamma:
        image = image**gamma
    if draws[4] < config.p_noise and sigma > 0:
        noise = torch.from_numpy(np.random.default_rng(noise_seed).normal(0, sigma, image.shape).astype(np.float32))
        image = torch.where(inside, image + noise, image)
    return image.clamp(0, 1).contiguous(), np.ascontiguousarray(label, dtype=np.int64)


def _plain(tensor) -> torch.Tensor:
    """A plain ``torch.Tensor`` from MONAI's output (a ``MetaTensor``, whose metadata the model must not see)."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)
