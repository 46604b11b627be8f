"""The model input: intensities, and the geometry between an image and the model's square input grid.

``model_input`` is the ONE function that turns a preprocessed slice into the tensor the image encoder sees; training
(``train.samples``), validation, evaluation, prediction and the interactive ``Predictor`` all call it, so a model is
always scored on exactly the inputs it was trained on. Slices that went through a preprocessing preset
(``data.preprocess``) are already in [0, 1] and are never rescaled again; ``to_unit_range`` is the documented rule for
raw images a user hands to ``Predictor``.

Every geometric operation comes as a pair that applies to images and to prompts (points in (x, y) order, boxes
XYXY), so a click drawn on the original image lands on the same anatomy in the model input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from samadapt.intensity import check_unit_range


@dataclass(frozen=True)
class InputGeometry:
    """How an (H, W) image maps onto a square model input of side ``size``.

    The image is resized so that its longest side equals ``size`` (keeping the aspect ratio), then padded at the
    bottom and right. ``resized`` is the (h, w) of the image inside the padded square.
    """

    original: tuple[int, int]
    size: int

    @property
    def resized(self) -> tuple[int, int]:
        h, w = self.original
        scale = self.size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def image_to_input(self, image: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """Resize (B, C, H, W) to the longest side ``size`` and zero-pad to (B, C, size, size)."""
        image = resize(image, self.resized, mode, antialias=mode == "bilinear")
        h, w = self.resized
        return F.pad(image, (0, self.size - w, 0, self.size - h))

    def coords_to_input(self, coords: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Scale (..., 2) (x, y) pixel coordinates of the original image to the model input."""
        h, w = self.original
        new_h, new_w = self.resized
        scale = np.array([new_w / w, new_h / h], dtype=np.float32)
        if isinstance(coords, torch.Tensor):
            return coords.to(torch.float32) * torch.as_tensor(scale, device=coords.device)
        return np.asarray(coords, dtype=np.float32) * scale

    def boxes_to_input(self, boxes: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Scale (..., 4) XYXY boxes of the original image to the model input."""
        corners = boxes.reshape(*boxes.shape[:-1], 2, 2)
        return self.coords_to_input(corners).reshape(boxes.shape)

    def masks_to_original(self, masks: torch.Tensor, from_size: int | None = None) -> torch.Tensor:
        """Undo the padding and resize (B, K, s, s) masks or logits back to (B, K, H, W).

        ``from_size`` is the side of ``masks`` when it differs from ``size`` (e.g. the 4x smaller low-res logits).
        """
        from_size = from_size or masks.shape[-1]
        h, w = self.resized
        crop_h = int(round(h * from_size / self.size))
        crop_w = int(round(w * from_size / self.size))
        if from_size != self.size:
            # upsample to the input grid first so that the crop is exact, as SAM does
            masks = resize(masks, (self.size, self.size), "bilinear")
            crop_h, crop_w = h, w
        return resize(masks[..., :crop_h, :crop_w], self.original, "bilinear")


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, 3) array -> (1, 3, H, W) float32 tensor (grey repeated over three channels)."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]


def model_input(image: np.ndarray, size: int) -> tuple[torch.Tensor, InputGeometry]:
    """A preprocessed (H, W) or (H, W, 3) slice in [0, 1] -> the model's input (1, 3, size, size) and its geometry.

    Resize the longest side to ``size`` (antialiased), zero-pad bottom / right, clamp the resampling overshoot to
    [0, 1]. The model's own pixel normalisation (``Sam.normalize``) happens inside the model.

    Raises:
        ValueError: the image is not in [0, 1] (it was not preprocessed: apply a preset, or give it to
            ``Predictor.set_image`` as a raw image).
    """
    image = np.asarray(image)
    check_unit_range(image)
    geometry = InputGeometry(original=tuple(image.shape[:2]), size=size)
    if image.ndim == 2:  # grey: resample one plane and repeat it, the same values as resampling three copies
        plane = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        return geometry.image_to_input(plane).clamp_(0, 1).repeat(1, 3, 1, 1), geometry
    return geometry.image_to_input(image_to_tensor(image)).clamp_(0, 1), geometry


def resize(
    tensor: torch.Tensor, size: tuple[int, int], mode: str = "bilinear", antialias: bool = False
) -> torch.Tensor:
    """Resize a (B, C, H, W) tensor; a no-op when the size already matches.

    Images are shrunk with ``antialias=True`` (as SAM does); logits are resized without it, as SAM does.
    """
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    if mode == "nearest":
        return F.interpolate(tensor, size=size, mode="nearest-exact")
    return F.interpolate(tensor, size=size, mode=mode, align_corners=False, antialias=antialias)
