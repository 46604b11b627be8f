"""The input geometry of SAM in numpy (no torch): resize, pad and clamp a slice to the model's square input, and
bring masks back to the slice's size. The deployment's own copy of ``samadapt.transforms``' geometry (that one needs
torch), for the torch-free ONNX runtime; the tests check both against each other."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from samadapt.intensity import check_unit_range

__all__ = ["InputGeometry", "model_input", "resize"]


# -- resampling, as torch.nn.functional.interpolate(mode="bilinear", align_corners=False) -------------------------


@lru_cache(maxsize=64)
def _linear_weights(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
    """(out, in) interpolation matrix of torch's 1-D bilinear resize (align_corners=False), with or without
    the antialiasing filter (which only matters when shrinking). Positions are computed in float32 as torch's CPU
    kernels do (a float64 scale moves the taps by ~1e-6)."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    weights = np.zeros((out_size, in_size), np.float32)
    if antialias:  # torch's _upsample_bilinear2d_aa: a triangle filter widened by the scale when shrinking
        support = scale if scale >= 1.0 else f32(1.0)
        invscale = f32(1.0) / scale if scale >= 1.0 else f32(1.0)
        for i in range(out_size):
            center = scale * f32(i + 0.5)
            lo = max(int(center - support + f32(0.5)), 0)
            hi = min(int(center + support + f32(0.5)), in_size)
            taps = np.arange(lo, hi, dtype=np.float32)
            w = np.clip(f32(1.0) - np.abs((taps - center + f32(0.5)) * invscale), f32(0.0), None)
            total = w.sum(dtype=np.float32)
            weights[i, lo:hi] = w / total if total != 0 else w
        weights.flags.writeable = False
        return weights
    for i in range(out_size):
        source = max(scale * f32(i + 0.5) - f32(0.5), f32(0.0))
        i0 = min(int(source), in_size - 1)
        i1 = i0 + 1 if i0 < in_size - 1 else i0
        frac = source - f32(i0)
        weights[i, i0] += f32(1.0) - frac
        weights[i, i1] += frac
    weights.flags.writeable = False
    return weights


@lru_cache(maxsize=64)
def _linear_taps(in_size: int, out_size: int, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """The taps of every output of ``_linear_weights(in_size, out_size, antialias)``: (out, K) columns and weights
    of each row's non-zero run, K its longest (2 without antialiasing; wider when shrinking with it). Taps past
    the last column repeat it with weight 0."""
    weights = _linear_weights(in_size, out_size, antialias)
    nonzero = weights != 0
    first = np.argmax(nonzero, axis=1)
    last = in_size - 1 - np.argmax(nonzero[:, ::-1], axis=1)
    wanted = first[:, None] + np.arange(max(int((last - first).max()) + 1, 2))
    columns = np.minimum(wanted, in_size - 1)
    taps = np.where(wanted < in_size, np.take_along_axis(weights, columns, axis=1), np.float32(0.0))
    columns.flags.writeable = taps.flags.writeable = False  # cached: shared by every call
    return columns, taps


def _resize_axis(array: np.ndarray, axis: int, out_size: int, antialias: bool) -> np.ndarray:
    """Resample one of the two last axes (-2 or -1) by summing its taps: no matrix product, so numpy's BLAS
    threads never wake (in a loop with onnxruntime, their spinning cost ~18 % of a slice's time)."""
    columns, taps = _linear_taps(array.shape[axis], out_size, antialias)
    out = None
    for k in range(columns.shape[1]):
        weight = taps[:, k, None] if axis == -2 else taps[:, k]
        term = np.take(array, columns[:, k], axis=axis) * weight
        out = term if out is None else np.add(out, term, out=out)
    return out


def resize(array: np.ndarray, size: tuple[int, int], antialias: bool = False) -> np.ndarray:
    """Bilinear resize of (..., H, W) float32 to (..., *size); a no-op when the size already matches."""
    if tuple(array.shape[-2:]) == tuple(size):
        return array
    array = array.astype(np.float32, copy=False)
    return _resize_axis(_resize_axis(array, -2, size[0], antialias), -1, size[1], antialias)


# -- the model input and its geometry (samadapt.transforms in numpy) ----------------------------------------------


@dataclass(frozen=True)
class InputGeometry:
    """How an (H, W) image maps onto a square model input of side ``size`` (see ``transforms.InputGeometry``)."""

    original: tuple[int, int]
    size: int

    @property
    def resized(self) -> tuple[int, int]:
        h, w = self.original
        scale = self.size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def image_to_input(self, image: np.ndarray) -> np.ndarray:
        """(B, C, H, W) -> resized (antialiased) and zero-padded (B, C, size, size) float32."""
        h, w = self.resized
        image = resize(image, (h, w), antialias=True)
        return np.pad(image, [(0, 0)] * (image.ndim - 2) + [(0, self.size - h), (0, self.size - w)])

    def coords_to_input(self, coords: np.ndarray) -> np.ndarray:
        """Scale (..., 2) (x, y) pixel coordinates of the original image to the model input."""
        h, w = self.original
        new_h, new_w = self.resized
        scale = np.array([new_w / w, new_h / h], dtype=np.float32)
        return np.asarray(coords, dtype=np.float32) * scale

    def boxes_to_input(self, boxes: np.ndarray) -> np.ndarray:
        """Scale (..., 4) XYXY boxes of the original image to the model input."""
        boxes = np.asarray(boxes, dtype=np.float32)
        corners = boxes.reshape(*boxes.shape[:-1], 2, 2)
        return self.coords_to_input(corners).reshape(boxes.shape)

    def masks_to_original(self, masks: np.ndarray, from_size: int | None = None) -> np.ndarray:
        """Undo the padding and resize (B, K, s, s) logits back to (B, K, H, W) (upsampled to ``size`` first)."""
        from_size = from_size or masks.shape[-1]
        h, w = self.resized
        crop_h = int(round(h * from_size / self.size))
        crop_w = int(round(w * from_size / self.size))
        if from_size != self.size:
            masks = resize(masks, (self.size, self.size))
            crop_h, crop_w = h, w
        return resize(masks[..., :crop_h, :crop_w], self.original)


def model_input(image: np.ndarray, size: int) -> tuple[np.ndarray, InputGeometry]:
    """A preprocessed (H, W) or (H, W, 3) slice in [0, 1] -> (1, 3, size, size) float32 and its geometry.

    The same function as ``samadapt.transforms.model_input``, in numpy.

    Raises:
        ValueError: the image is not in [0, 1], or not (H, W) / (H, W, 3).
    """
    image = np.asarray(image)
    check_unit_range(image)
    grey = image.ndim == 2
    if grey:  # resample one plane and repeat it (the same values as three copies, a third of the work)
        image = image[..., None]
    elif image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")
    geometry = InputGeometry(original=tuple(image.shape[:2]), size=size)
    tensor = np.ascontiguousarray(image, dtype=np.float32).transpose(2, 0, 1)[None]
    tensor = np.clip(geometry.image_to_input(tensor), 0.0, 1.0).astype(np.float32, copy=False)
    return (np.repeat(tensor, 3, axis=1) if grey else tensor), geometry
