"""Which mask answers a prompt: for one click alone, the best of SAM's three candidates, or the single mask.

The rule (``one_click_best``) has three settings (``ONE_CLICK_RULES``):
- ``best`` (the default): SAM's practice, the candidate its IoU head rates best, for every model;
- ``trained``: the best of three only where the candidates were trained (the un-adapted model, a run trained with
  multimask outputs: ``prompt.multimask``), the single-mask output (token 0) for a run that trained only it. On
  brain structures that are not blobs this lifted Cheap Lunch's one click 0.29 -> 0.69 (issue 30); whether it holds
  on every task is the accuracy protocol's to show (``bench/accuracy.py --one-click``) before it may be the default;
- ``single``: always token 0.

numpy only (no torch import), so ``samadapt.predict.Predictor``, ``samadapt.runs.Run`` and the torch-free ONNX
runtime (``samadapt.export.runtime.OnnxPredictor``) share the one rule.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

SINGLE, MULTIMASK, SEMANTIC = "single", "multimask", "semantic"  # the mask outputs a run's training taught
ONE_CLICK_RULES = ("best", "trained", "single")
DEFAULT_ONE_CLICK = "best"


def trained_masks(task: str, prompt: Mapping | None) -> str:
    """The mask outputs that training taught, from a run's task and its training prompt settings: ``semantic``,
    ``multimask`` (``prompt.multimask``: tokens 1..3 for one click alone) or ``single`` (token 0). A manifest written
    before the setting was recorded trained with its default, off: ``single``."""
    if task == "semantic":
        return SEMANTIC
    return MULTIMASK if (prompt or {}).get("multimask", False) else SINGLE


def check_one_click(rule: str) -> str:
    """``rule`` if it is one of ``ONE_CLICK_RULES``, else a ``ConfigError``."""
    if rule not in ONE_CLICK_RULES:
        from samadapt.errors import ConfigError

        raise ConfigError(f"unknown one-click rule {rule!r}: choose one of {', '.join(ONE_CLICK_RULES)}")
    return rule


def one_click_best(run_manifest: Mapping | None, rule: str = DEFAULT_ONE_CLICK) -> bool:
    """Whether one click alone is answered by the best of the three candidates (``best_candidate``) under ``rule``
    (module docstring). The one rule for predict, evaluate, the API, the trainer's validation, the ONNX runtime and
    the app.

    Args:
        run_manifest: a run's manifest as a dict (``runs.Manifest.to_dict``, or the ``run_manifest`` an ONNX export
            keeps); None or empty: a bare model. Under ``trained``, its ``outputs.masks`` decides; a manifest
            without it (written before schema 2) is read by ``trained_masks``.
        rule: ``best``, ``trained`` or ``single``.

    Raises:
        ConfigError: an unknown rule.
    """
    if check_one_click(rule) != "trained":
        return rule == "best"
    if not run_manifest:
        return True
    masks = (run_manifest.get("outputs") or {}).get("masks")
    if masks is None:
        masks = trained_masks(run_manifest.get("task", "prompt"), run_manifest.get("prompt"))
    return masks == MULTIMASK


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
