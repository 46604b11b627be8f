"""What every inference backend answers: the ``Prediction`` and the ``SegmentationPredictor`` protocol.

numpy only (no torch import): the torch ``samadapt.predict.Predictor`` and the torch-free ONNX runtime
(``samadapt.export.runtime.OnnxPredictor``) both implement the protocol and return this one ``Prediction``; the
consumers (``predict_volume``, ``evaluate``, the app) take any predictor and never ask which backend it runs on.
A predictor is made by ``samadapt.inference.load_predictor``, the one place that reads a backend's name.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["Prediction", "SegmentationPredictor"]


@dataclass
class Prediction:
    """Masks at the original size (P, K, H, W) bool, IoU scores (P, K) float32, and the low-res logits
    (P, K, s/4, s/4) float32 in the backend's own array type (a torch tensor on the predictor's device, or a numpy
    array from onnxruntime), so that they go back to the same predictor as ``mask_input`` without a copy."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray | torch.Tensor


@runtime_checkable
class SegmentationPredictor(Protocol):
    """Encode an image once (``set_image``), then decode masks for prompts (``predict``) or class maps of a semantic
    model (``predict_semantic``, ``semantic_batch``).

    Attributes:
        device: where it computes (``.type`` is ``"cpu"`` or ``"cuda"``; consumers size their batches by it).
        cache_size: how many embeddings ``set_image(..., cache_key=...)`` keeps (least recently used dropped first).
        select_single_click: one click alone answers with the best of SAM's three candidates (``selection``).
        run: what the predictor segments for (a ``runs.Run`` or an export's ``ExportedRun``: preprocessing preset,
            slicing axis, task, classes), or None for a predictor built on a bare model.
    """

    device: Any
    cache_size: int
    select_single_click: bool
    run: Any

    def set_image(self, image: np.ndarray, preprocessed: bool = False, cache_key: Hashable | None = None) -> None:
        """Encode an (H, W) or (H, W, 3) image; ``preprocessed``: already in [0, 1] through a preset."""

    def is_cached(self, cache_key: Hashable) -> bool:
        """Whether ``set_image(..., cache_key=cache_key)`` would cost no encoder call."""

    def predict(
        self,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: Any = None,
        multimask_output: bool | None = None,
        text: str | Sequence[str] | None = None,
    ) -> Prediction:
        """Masks for one prompt set, or for P prompt sets at once, in pixels of the original image."""

    def predict_semantic(self, position: float | None = None) -> np.ndarray:
        """Prompt-free class map of the current image: (H, W) int."""

    def semantic_batch(self, images: Sequence[np.ndarray], positions: Sequence[float] | None = None) -> np.ndarray:
        """Prompt-free class maps of several preprocessed slices of one size: (B, H, W) int."""
