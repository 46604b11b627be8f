"""Interactive prediction: encode an image once, then decode masks for any number of prompts.

The predictor owns the image geometry: prompts are given in (x, y) pixels of the original image and masks come back
at the original size. Intensities: uint8 images are divided by 255, anything else is min-max scaled to [0, 1]; the
model then applies its checkpoint's own normalisation (``Sam.normalize``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from samadapt.models.sam import Sam
from samadapt.transforms import InputGeometry


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """An (H, W) or (H, W, 3) image as float32 in [0, 1]: uint8 / 255, otherwise min-max (constant -> 0)."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    image = image.astype(np.float32)
    low, high = float(image.min()), float(image.max())
    return (image - low) / max(high - low, 1e-8)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, 3) array in [0, 1] -> (1, 3, H, W) float tensor (grey repeated over three channels)."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()


@dataclass
class Prediction:
    """Masks at the original size (P, K, H, W) bool, IoU scores (P, K), low-res logits (P, K, s/4, s/4)."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: torch.Tensor


class Predictor:
    """Cache an image embedding, then predict masks for points, boxes or a previous mask.

    Example:
        >>> predictor = Predictor(build_model("lite_medsam"))
        >>> predictor.set_image(slice_2d)
        >>> out = predictor.predict(boxes=np.array([[x0, y0, x1, y1]]))
    """

    def __init__(self, model: Sam, device: str | torch.device | None = None, bfloat16: bool = False) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.bfloat16 = bfloat16
        self.geometry: InputGeometry | None = None
        self.embedding: torch.Tensor | None = None

    def _autocast(self):
        if not self.bfloat16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @torch.inference_mode()
    def set_image(self, image: np.ndarray) -> None:
        """Encode an (H, W) or (H, W, 3) image and keep its embedding for the following ``predict`` calls."""
        image = np.asarray(image)
        self.geometry = InputGeometry(original=tuple(image.shape[:2]), size=self.model.img_size)
        tensor = image_to_tensor(to_unit_range(image)).to(self.device)
        with self._autocast():
            self.embedding = self.model.encode_image(self.geometry.image_to_input(tensor)).float()

    @torch.inference_mode()
    def predict(
        self,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> Prediction:
        """Masks for one prompt set, or for P boxes at once.

        Args:
            points: (N, 2) or (P, N, 2) clicks in (x, y) pixels of the original image.
            labels: (N,) or (P, N): 1 foreground, 0 background.
            boxes: (4,) or (P, 4) XYXY in pixels of the original image.
            mask_input: (1, s/4, s/4) or (P, 1, s/4, s/4) low-res logits of a previous prediction.
            multimask_output: three candidate masks per prompt set instead of one.
        """
        if self.embedding is None or self.geometry is None:
            raise RuntimeError("call set_image() before predict()")
        geometry = self.geometry
        point_input = None
        if points is not None:
            if labels is None:
                raise ValueError("points need labels (1 foreground, 0 background)")
            coords = torch.as_tensor(geometry.coords_to_input(np.asarray(points)), device=self.device)
            point_labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64, device=self.device)
            if coords.dim() == 2:
                coords, point_labels = coords[None], point_labels[None]
            point_input = (coords, point_labels)
        box_input = None
        if boxes is not None:
            box_input = torch.as_tensor(geometry.boxes_to_input(np.asarray(boxes)), device=self.device)
            box_input = box_input.reshape(-1, 4)
        if mask_input is not None:
            mask_input = torch.as_tensor(mask_input, dtype=torch.float32, device=self.device)
            if mask_input.dim() == 3:
                mask_input = mask_input[None]
        with self._autocast():
            logits, scores = self.model.decode(
                self.embedding, point_input, box_input, mask_input, multimask_output=multimask_output
            )
        logits, scores = logits.float(), scores.float()
        masks = geometry.masks_to_original(logits, from_size=logits.shape[-1]) > 0
        return Prediction(masks=masks.cpu().numpy(), scores=scores.cpu().numpy(), low_res_logits=logits)
