"""The interactive protocol on volumes (``samadapt evaluate --prompt interactive[:N]``), as the CVPR 2025 challenge
"Foundation Models for Interactive 3D Biomedical Image Segmentation" measures a model.

Per object (a class present in a volume): its 3D bounding box starts it, given as the challenge gives it: the
object's 2D box on its middle slice and its first and last slice (``interactive.VolumeObject.start``: the middle
slice segmented, the mask propagated through the box's slices), then N corrective clicks (default 5), each in
the largest 3D error component (``prompts.corrective_click_3d``: positive in a miss, negative in a false positive)
and answered by re-segmenting its slice and re-propagating (``VolumeObject.click``). After every step the object is
scored in 3D with the voxel spacing (Dice, NSD at ``tolerance_mm``). Reported per object and as means per class:

- the Dice and NSD of every step (0: the box alone);
- DSC-AUC and NSD-AUC: the area under the Dice / NSD of the N click steps by the trapezoid rule at unit spacing,
  the challenge's definition (from 0 to N - 1: 4.0 for a perfect object with 5 clicks);
- the final Dice / NSD (and IoU, HD95: the rows of metrics.csv are the final masks);
- the model's seconds per object (encoder and decoder calls, not the scoring);
- clicks to Dice 0.9 (``TARGET_DICE``): the first step that reaches it, None when none of the N does.

Two departures from the challenge, both in favour of the slice-wise model's user: a click goes to the slice where the
largest error component is largest (the challenge clicks its 3D centre, which a 2D model cannot take as such), and
the NSD is computed at every step (the challenge sets it to 0 where Dice <= 0.2).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from samadapt.eval.metrics import aggregate, binary_metrics
from samadapt.files import atomic_write_text
from samadapt.interactive import VolumeObject
from samadapt.prediction import SegmentationPredictor
from samadapt.prompts import box_from_mask, corrective_click_3d

DEFAULT_CLICKS = 5
TARGET_DICE = 0.9
MAX_CACHED_SLICES = 256  # embeddings kept while one volume is worked on (LiteMedSAM: 4 MB each)


def area_under(values: Sequence[float]) -> float:
    """The trapezoid area under ``values`` at unit spacing (NaN counted as 0, as an empty prediction scores)."""
    clean = [0.0 if not math.isfinite(v) else float(v) for v in values]
    return float(sum((a + b) / 2.0 for a, b in zip(clean[:-1], clean[1:], strict=True)))


def score_object(
    segmenter: VolumeObject, gt: np.ndarray, spacing: Sequence[float], clicks: int, tolerance_mm: float
) -> dict:
    """Run the protocol on one object: ``gt`` (Z, H, W) bool in ``segmenter``'s stack; returns its curves and
    summary figures (module docstring)."""
    slices = np.flatnonzero(gt.any(axis=(1, 2)))
    if not len(slices):
        raise ValueError("the object is empty: there is nothing to box")
    # the challenge's box: the object's box on its middle slice (the nearest slice holding it), and its slice range
    first, last = int(slices[0]), int(slices[-1])
    middle = int(slices[np.argmin(np.abs(slices - (first + last) // 2))])
    seconds = 0.0
    tick = time.perf_counter()
    segmenter.start(first, last, box_from_mask(gt[middle]), middle)
    seconds += time.perf_counter() - tick
    steps = [binary_metrics(segmenter.mask, gt, spacing, tolerance_mm)]
    placed = []
    for _ in range(clicks):
        found = corrective_click_3d(gt, segmenter.mask)
        if found is not None:  # a perfect mask needs no click: it stays as it is
            index, click = found
            placed.append([index, click.x, click.y, int(click.positive)])
            tick = time.perf_counter()
            segmenter.click(index, click)
            seconds += time.perf_counter() - tick
        steps.append(binary_metrics(segmenter.mask, gt, spacing, tolerance_mm) if found is not None else steps[-1])
    dice = [s["dice"] for s in steps]
    nsd = [s["nsd"] for s in steps]
    reached = next((k for k, d in enumerate(dice) if d >= TARGET_DICE), None)
    return {
        "dice_steps": dice,
        "nsd_steps": nsd,
        "dsc_auc": area_under(dice[1:]),
        "nsd_auc": area_under(nsd[1:]),
        "final": steps[-1],
        "seconds": seconds,
        "clicks_to_target": reached,
        "clicks": placed,
    }


def summarise(curves: Sequence[dict], class_names: Sequence[str], clicks: int) -> dict:
    """Means per class (and over classes) of the per-object curves: Dice / NSD per step, DSC-AUC, NSD-AUC, final
    Dice / NSD, seconds per object, how many objects reached ``TARGET_DICE`` and the mean step they did so at."""

    def means(mine: list[dict]) -> dict:
        if not mine:
            return {}
        reached = [c["clicks_to_target"] for c in mine if c["clicks_to_target"] is not None]
        return {
            "objects": len(mine),
            "dice_steps": np.mean([c["dice_steps"] for c in mine], axis=0).tolist(),
            "nsd_steps": np.mean([c["nsd_steps"] for c in mine], axis=0).tolist(),
            "dsc_auc": float(np.mean([c["dsc_auc"] for c in mine])),
            "nsd_auc": float(np.mean([c["nsd_auc"] for c in mine])),
            "final_dice": float(np.mean([c["dice_steps"][-1] for c in mine])),
            "final_nsd": float(np.mean([c["nsd_steps"][-1] for c in mine])),
            "seconds": float(np.mean([c["seconds"] for c in mine])),
            "reached_target": len(reached),
            "clicks_to_target": float(np.mean(reached)) if reached else None,
        }

    per_class = {name: means([c for c in curves if c["class"] == name]) for name in class_names}
    present = [v for v in per_class.values() if v]
    overall = {}
    for key in ("dsc_auc", "nsd_auc", "final_dice", "final_nsd", "seconds"):
        overall[key] = float(np.mean([v[key] for v in present])) if present else math.nan
    for key in ("dice_steps", "nsd_steps"):
        overall[key] = np.mean([v[key] for v in present], axis=0).tolist() if present else []
    return {"clicks": clicks, "target_dice": TARGET_DICE, **overall, "per_class": per_class}


@contextmanager
def _cache_at_least(predictor: SegmentationPredictor, size: int):
    """The predictor keeps at least ``size`` embeddings within the block: re-propagation revisits slices."""
    before = predictor.cache_size
    predictor.cache_size = max(before, size)
    try:
        yield
    finally:
        predictor.cache_size = before


def evaluate_interactive(
    run,
    slices,
    case_ids: Sequence[str],
    classes: dict[int, str],
    predictor: SegmentationPredictor,
    clicks: int = DEFAULT_CLICKS,
    tolerance_mm: float = 2.0,
    memory: bool = False,
    progress: bool = True,
    finished_dir: Path | None = None,
    clicks_as: str = "points",
) -> tuple[list[dict], dict]:
    """The interactive protocol on whole volumes of a ``SliceDataset``; returns the rows of the final masks per
    (case, class) and their ``aggregate``, which holds ``"interactive"`` (``summarise``) besides.

    Volumes are read one at a time and each object is worked on with the embeddings of its slices cached. With
    ``finished_dir``, each volume's results are written there as soon as it is done and not computed again.
    ``clicks_as``: how the clicks are given (``interactive.VolumeObject``: SAM point prompts, or box edits).
    """
    from tqdm.auto import tqdm

    by_case: dict[str, dict[int, int]] = {}
    for i, (case, z, _) in enumerate(slices.slices):
        by_case.setdefault(case, {})[z] = i
    rows, curves = [], []
    for case_id in tqdm(case_ids, desc=f"{run.label} interactive:{clicks}", disable=not progress, unit="volume"):
        done = finished_dir / f"{case_id}.json" if finished_dir is not None else None
        if done is not None and done.exists():
            saved = json.loads(done.read_text())
            rows += saved["rows"]
            curves += saved["curves"]
            continue
        image, label = slices.read_case(case_id)
        axis = slices.axis
        planes = np.moveaxis(label.array, axis, 0)
        spacing = (image.spacing[axis], *[s for k, s in enumerate(image.spacing) if k != axis])
        this_case = object()  # keys this volume's embeddings apart in a predictor reused across volumes

        def encode(index: int, case_id: str = case_id, key: object = this_case) -> None:
            item = slices[by_case[case_id][index]]
            predictor.set_image(item["image"], preprocessed=True, cache_key=(key, index))

        case_rows, case_curves = [], []
        with _cache_at_least(predictor, min(planes.shape[0], MAX_CACHED_SLICES)):
            for class_id, name in classes.items():
                gt = planes == class_id
                if not gt.any():
                    continue  # as the challenge: only the objects a volume holds
                segmenter = VolumeObject(predictor, encode, gt.shape, memory=memory, clicks_as=clicks_as)
                result = score_object(segmenter, gt, spacing, clicks, tolerance_mm)
                case_rows.append({"case": case_id, "slice": -1, "class": name, **result.pop("final")})
                case_curves.append({"case": case_id, "class": name, **result})
        rows += case_rows
        curves += case_curves
        if done is not None:
            atomic_write_text(done, json.dumps({"rows": case_rows, "curves": case_curves}))
    names = list(classes.values())
    summary = aggregate(rows, names)
    summary["interactive"] = {**summarise(curves, names, clicks), "memory": memory, "clicks_as": clicks_as}
    return rows, summary
