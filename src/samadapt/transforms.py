"""Geometry between an image and the model input: resize the longest side, pad to a square, and back.

Every operation comes as a pair that applies to images and to prompts (points in (x, y) order, boxes XYXY), so a
click drawn on the original image lands on the same anatomy in the model input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


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
