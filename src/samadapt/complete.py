"""Sparse slices to a full volume (``samadapt complete``): the labelled slices of one volume adapt a model, which
labels every other slice; the given slices are kept exactly.

The workflow of a user who labels a few slices of a scan and wants the rest, the "fill between slices" of Slicer or
ITK-SNAP done by a model: the semantic recipe (SAMed by default: no prompt, K + 1 class masks) trains on the given
slices only, predicts the whole volume along the same axis, and the given slices are written back over its
prediction bit for bit. An already trained semantic run can be given instead (``run``), then nothing trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from samadapt.data.io import Volume
from samadapt.data.position import slice_position
from samadapt.data.preprocess import preprocess_volume, volume_slice
from samadapt.demo import recipe_config
from samadapt.errors import ConfigError, DataError

DEFAULT_STEPS = 120  # the demo's budget for SAMed on a few brain slices (docs/demo.md); `samadapt complete --steps`
DEFAULT_LR = 1e-3


def labelled_slices(labels: Volume, axis: int, slices: Sequence[int] | None = None) -> list[int]:
    """The slices along ``axis`` the user labelled: ``slices`` when given (an empty slice may be labelled too),
    else those holding any label.

    Raises:
        DataError: no slice is labelled, or a given slice is outside the volume (naming the file).
    """
    depth = labels.array.shape[axis]
    if slices is not None:
        outside = sorted(z for z in slices if not 0 <= z < depth)
        if outside:
            raise DataError(
                f"{labels.path}: slices {outside} are outside the volume (0..{depth - 1} along axis {axis})"
            )
        return sorted(set(slices))
    found = np.flatnonzero(np.moveaxis(labels.array, axis, 0).reshape(depth, -1).any(axis=1)).tolist()
    if not found:
        raise DataError(f"{labels.path}: no slice holds a label along axis {axis}: label a few slices first")
    return found


def complete_volume(
    image: Volume,
    labels: Volume,
    run_dir: str | Path | None = None,
    run=None,
    recipe: str = "samed",
    steps: int = DEFAULT_STEPS,
    batch_size: int = 4,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    axis: int = 0,
    slices: Sequence[int] | None = None,
    preprocessing: str = "mr",
    classes: dict[int, str] | None = None,
    device: str | None = None,
    overrides: Sequence[str] = (),
) -> np.ndarray:
    """Labels for every slice of ``image`` from the labelled slices of ``labels`` (same grid); returns them on the
    volume's grid, the labelled slices exactly as given.

    Args:
        run_dir: where the adapted run is written (a run directory, usable with ``predict`` afterwards); needed
            unless ``run`` is given.
        run: a loaded semantic ``Run`` to predict with instead of training one.
        recipe, steps, batch_size, lr, seed, overrides: the training (a semantic recipe; ``--set`` overrides).
        slices: which slices are labelled (default: those holding a label).
        classes: class id -> name (default: the ids found, named ``class N``).

    Raises:
        DataError: the two volumes differ in shape, or nothing is labelled. ConfigError: a prompted recipe or run.
    """
    from samadapt.predict import predict_volume
    from samadapt.runs import load_run
    from samadapt.train.api import fit_slices
    from samadapt.train.config import TrainConfig, layered_config

    if image.array.shape[:3] != labels.array.shape[:3]:
        raise DataError(f"{labels.path}: labels {labels.array.shape} do not match the image {image.array.shape}")
    given = labelled_slices(labels, axis, slices)
    planes = np.moveaxis(labels.array, axis, 0)
    if run is None:
        if run_dir is None:
            raise ConfigError("give a run directory to write the adapted run to, or a trained run")
        found = sorted(int(v) for v in np.unique(planes[given]) if v > 0)
        if not found:
            raise DataError(f"{labels.path}: the labelled slices {given} hold no class")
        classes = classes or {c: f"class {c}" for c in found}
        config = recipe_config(recipe, steps, batch_size, seed, lr=lr, device=device)
        if overrides:
            config = layered_config(TrainConfig, config.to_dict(), sets=list(overrides))
        if config.task != "semantic":
            raise ConfigError(f"complete trains a semantic recipe (samed); {recipe} is prompted")
        config.data.axis = axis
        array = preprocess_volume(image.array, preprocessing)
        spacing = tuple(s for k, s in enumerate(image.spacing) if k != axis)
        name = Path(str(image.path or "volume")).name
        items = [
            {
                "image": volume_slice(array, z, axis, preprocessing),
                "label": planes[z].astype(np.int64),
                "case": name,
                "slice": z,
                "position": slice_position(z, planes.shape[0]),
                "spacing": spacing,
            }
            for z in given
        ]
        fit_slices(config, items, [], classes, run_dir, preprocessing, verbose=False)
        run = load_run(run_dir, checkpoint="last", device=device)
    if run.task != "semantic":
        raise ConfigError(f"{run.label} is prompted: complete needs a semantic run (recipe samed)")
    predicted = predict_volume(run, image, preprocessing=preprocessing, axis=axis, device=device)
    out = np.moveaxis(predicted, axis, 0)  # a view: writing a plane writes the volume
    out[given] = planes[given]
    return predicted
