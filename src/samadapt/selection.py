"""Which mask answers an ambiguous prompt: for one click alone, the best of SAM's three candidates.

numpy only (no torch import), so ``samadapt.predict.Predictor`` and the torch-free ONNX runtime
(``samadapt.export.runtime.OnnxPredictor``) share the one rule.
"""

from __future__ import annotations

import numpy as np


def is_single_click(labels, boxes, mask_input) -> bool:
    """Whether a prompt set is one click and nothing else: SAM's ambiguous case (a click on a lesion may mean the
    lesion, the organ around it or the whole body part), where its three multimask candidates are decoded and the one
    the IoU head rates best is kept. Any further click, box or mask prompt disambiguates: the single-mask output."""
    if labels is None or boxes is not None or mask_input is not None:
        return False
    shape = np.shape(labels)
    return len(shape) > 0 and shape[-1] == 1


def best_candidate(logits, scores):
    """From (P, 3, h, w) candidate logits and (P, 3) predicted IoUs, the candidate with the highest predicted IoU per
    prompt set: ((P, 1, h, w), (P, 1)); torch tensors or numpy arrays (the ONNX runtime's)."""
    best = scores.argmax(1)
    rows = np.arange(scores.shape[0])
    if not isinstance(scores, np.ndarray):  # a torch tensor (this module imports no torch)
        rows = best.new_tensor(rows)
    return logits[rows, best][:, None], scores[rows, best][:, None]
