"""One open case of the app (``Session``): its volume, its labels, the prompts per slice and the undo history.

Conventions as in ``serve.session``: a slice is taken along ``axis`` at ``index`` with ``data.preprocess.volume_slice``
(exactly the slice training used); labels live on the case's grid, one integer class id per voxel.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samadapt.data.io import Volume
from samadapt.data.preprocess import volume_slice
from samadapt.serve.dicom_cases import case_name

PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4")
UNDO_BYTES = 512 << 20  # undo history per case; whole-volume steps (propagation) are the large ones


@dataclass
class Edit:
    """One undoable step: the labels it replaced (one plane, or the whole volume when ``index`` is None) and the
    prompts before it."""

    what: str
    axis: int
    index: int | None
    labels: np.ndarray
    prompts: dict


@dataclass
class Session:
    """One open case.

    Attributes:
        volume: the case as read (``array`` (Z, Y, X) or (Z, Y, X, C)).
        array: ``volume.array`` after the volume-wise part of ``preset``.
        labels: (Z, Y, X) int32 class ids.
        objects: class id -> {"name", "color"}.
        prompts: (object, axis, index) -> {"points": [[x, y, label], ...], "box": [x0, y0, x1, y1] | None}.
        finished: (axis, index) of the slices the user has edited (the training slices of "adapt").
    """

    id: str
    path: Path
    volume: Volume
    preset: str
    axis: int
    array: np.ndarray
    labels: np.ndarray
    objects: dict[int, dict]
    dataset: Path | None = None
    prompts: dict = field(default_factory=dict)
    finished: set = field(default_factory=set)
    undo: list[Edit] = field(default_factory=list)
    redo: list[Edit] = field(default_factory=list)
    dirty: bool = False
    restored: float | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)

    def plane(self, axis: int, index: int) -> np.ndarray:
        """The labels of one slice: a view, so writing it writes the volume."""
        if axis not in (0, 1, 2) or not 0 <= index < self.labels.shape[axis]:
            raise ValueError(f"slice {index} along axis {axis} is outside the volume {self.labels.shape}")
        return np.moveaxis(self.labels, axis, 0)[index]

    def image(self, axis: int, index: int) -> np.ndarray:
        """The model's input slice: float32 (H, W) or (H, W, 3) in [0, 1]."""
        self.plane(axis, index)  # bounds check
        return volume_slice(self.array, index, axis, self.preset)

    def raw(self, axis: int, index: int) -> np.ndarray:
        """The slice as stored in the file (for display with any window): (H, W) or (H, W, C)."""
        self.plane(axis, index)
        return np.ascontiguousarray(np.take(self.volume.array, index, axis=axis))

    def remember(self, what: str, axis: int, index: int | None) -> None:
        labels = self.labels.copy() if index is None else self.plane(axis, index).copy()
        self.undo.append(Edit(what, axis, index, labels, copy.deepcopy(self.prompts)))
        del self.undo[:-50]
        while len(self.undo) > 1 and sum(e.labels.nbytes for e in self.undo) > UNDO_BYTES:
            self.undo.pop(0)
        self.redo.clear()
        self.dirty = True

    def _swap(self, source: list[Edit], target: list[Edit]) -> Edit | None:
        if not source:
            return None
        edit = source.pop()
        current = self.labels if edit.index is None else self.plane(edit.axis, edit.index)
        target.append(Edit(edit.what, edit.axis, edit.index, current.copy(), copy.deepcopy(self.prompts)))
        current[...] = edit.labels
        self.prompts = edit.prompts
        self.dirty = True
        return edit

    def undo_last(self) -> Edit | None:
        return self._swap(self.undo, self.redo)

    def redo_last(self) -> Edit | None:
        return self._swap(self.redo, self.undo)

    def add_object(self, name: str | None = None, value: int | None = None) -> int:
        value = value or max(self.objects, default=0) + 1
        self.objects[value] = {"name": name or f"object {value}", "color": PALETTE[(value - 1) % len(PALETTE)]}
        self.dirty = True
        return value

    def summary(self) -> dict:
        return {
            "session": self.id,
            "path": str(self.path),
            "name": case_name(self.path, self.volume),
            "shape": list(self.labels.shape),
            "channels": int(self.volume.array.shape[3]) if self.volume.array.ndim == 4 else 1,
            "spacing": list(self.volume.spacing),
            "preset": self.preset,
            # the volume's z index runs towards the head (RAS): slices along Y or X are shown with z upwards
            "z_up": bool(self.volume.affine[2, 2] > 0),
            "axis": self.axis,
            "objects": {str(k): v for k, v in self.objects.items()},
            "window": _windows(self.volume.array, self.preset),
            "restored": self.restored,
            "finished": sorted([list(k) for k in self.finished]),
            # a DICOM case may also be saved as a DICOM SEG or an RT Structure Set on its series
            "dicom": self.volume.dicom is not None,
        }


def _windows(array: np.ndarray, preset: str) -> dict:
    """Display windows (low, high in stored intensities): the model's preset, percentiles, full range, CT windows."""
    sample = np.asarray(array[:: max(1, array.shape[0] // 16)], np.float32)
    finite = sample[np.isfinite(sample)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    p1, p99 = (float(v) for v in np.percentile(finite, [0.5, 99.5])) if finite.size else (low, high)
    windows = {"percentile 0.5-99.5": [p1, p99], "full range": [low, high]}
    windows["CT abdomen W400 L40"] = [-160.0, 240.0]
    windows["CT lung W1500 L-600"] = [-1350.0, 150.0]
    windows["CT bone W1800 L400"] = [-500.0, 1300.0]
    from samadapt.data.preprocess import CT_WINDOWS

    default = list(CT_WINDOWS[preset]) if preset in CT_WINDOWS else [p1, p99] if preset != "rgb" else [0.0, 255.0]
    return {"default": default, "presets": windows}
