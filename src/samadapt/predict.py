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

    @torch.inference_mode()
    def predict_semantic(self) -> np.ndarray:
        """Prompt-free class map of the current image (semantic models): (H, W) int, 0 = background, k = class k."""
        if self.embedding is None or self.geometry is None:
            raise RuntimeError("call set_image() before predict_semantic()")
        with self._autocast():
            logits, _ = self.model.decode(self.embedding)
        logits = self.geometry.masks_to_original(logits.float(), from_size=logits.shape[-1])
        return logits.argmax(1)[0].cpu().numpy()


def predict_volume(
    run,
    volume,
    points: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    preprocessing: str | None = None,
    bfloat16: bool = False,
) -> np.ndarray:
    """Segment a whole ``Volume`` slice by slice along axis 0; returns (Z, Y, X) integer labels.

    Semantic runs need no prompt. Prompted runs take voxel-coordinate prompts: ``points`` rows (x, y, z, label),
    ``boxes`` rows (x0, y0, x1, y1, z) for one slice each, or one row (x0, y0, z0, x1, y1, z1): a volume box whose
    middle slice is segmented first, each next slice then prompted with the box of its neighbour's mask, outward,
    until the box's z range ends or the mask vanishes (LiteMedSAM's way).
    """
    from samadapt.data.preprocess import SLICE_WISE, normalize

    preset = preprocessing or run.manifest.get("preprocessing") or "mr"
    array = volume.array if preset in SLICE_WISE else normalize(volume.array, preset)

    def slice_image(z: int) -> np.ndarray:
        return normalize(array[z], preset) if preset in SLICE_WISE else array[z]

    predictor = Predictor(run.model, device="cpu", bfloat16=bfloat16)
    labels = np.zeros(volume.array.shape[:3], np.int16)
    class_ids = list(run.classes) or [1]
    if run.task == "semantic":
        lookup = np.array([0, *class_ids])
        for z in range(labels.shape[0]):
            predictor.set_image(slice_image(z))
            labels[z] = lookup[predictor.predict_semantic()]
        return labels
    value = class_ids[0]
    if points is None and boxes is None:
        raise ValueError("this model is prompted: give --points or --boxes (voxel coordinates)")
    if points is not None:
        points = np.atleast_2d(points)
        for z in np.unique(points[:, 2]).astype(int):
            rows = points[points[:, 2] == z]
            predictor.set_image(slice_image(z))
            mask = predictor.predict(points=rows[:, :2], labels=rows[:, 3].astype(int)).masks[0, 0]
            labels[z][mask] = value
    if boxes is not None:
        boxes = np.atleast_2d(boxes)
        if boxes.shape[1] == 6:
            _propagate_box(predictor, slice_image, labels, boxes[0], value)
        elif boxes.shape[1] == 5:
            for x0, y0, x1, y1, z in boxes:
                predictor.set_image(slice_image(int(z)))
                labels[int(z)][predictor.predict(boxes=np.array([x0, y0, x1, y1])).masks[0, 0]] = value
        else:
            raise ValueError("boxes need 5 columns (x0, y0, x1, y1, z) or 6 (x0, y0, z0, x1, y1, z1)")
    return labels


def _propagate_box(predictor: Predictor, slice_image, labels: np.ndarray, box: np.ndarray, value: int) -> None:
    x0, y0, z0, x1, y1, z1 = box
    z0, z1 = int(max(z0, 0)), int(min(z1, labels.shape[0] - 1))
    middle = (z0 + z1) // 2
    for direction in (1, -1):
        current = np.array([x0, y0, x1, y1], np.float32)
        z = middle if direction == 1 else middle - 1
        while z0 <= z <= z1:
            predictor.set_image(slice_image(z))
            mask = predictor.predict(boxes=current).masks[0, 0]
            if not mask.any():
                break
            labels[z][mask] = value
            ys, xs = np.nonzero(mask)
            current = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)
            z += direction
