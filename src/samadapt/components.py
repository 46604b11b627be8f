"""Connected components of predicted masks: outputs consistent with their prompt, and one piece per class in 3D.

Two options, both off by default (a default that changes predictions needs the accuracy protocol behind it):

- ``keep_prompted``, ``--keep-components prompt``: of a 2D mask answering a prompt, keep only the connected
  components the prompt points at: those a positive click falls on, and those that overlap the box. A mask with
  pixels never comes back empty: when no component is touched (a click on a hole, a box beside the mask), the
  component nearest to the positive clicks (else to the box) is kept. Negative clicks choose nothing; a prompt with
  neither a positive click nor a box, and an empty mask, are returned as they are.
- ``keep_largest``, ``--largest-component CLASSES``: per class of a 3D label volume, only its largest connected
  component. Whether it pays is decided per class from labelled slices
  (``eval.postprocess.decide_largest_component``), as nnU-Net
  decides its "largest component only" rule per class on validation data.

Components are 8-connected in 2D and 26-connected in 3D (every neighbour, diagonals included). numpy and
scipy.ndimage only (imported when used: the torch-free ONNX runtime imports this module).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

KEEP_COMPONENTS = ("all", "prompt")  # the --keep-components choices: every component, or those the prompt touches


def check_keep_components(mode: str) -> str:
    """``mode`` if it is one of ``KEEP_COMPONENTS``, else a ``ConfigError``."""
    if mode not in KEEP_COMPONENTS:
        from samadapt.errors import ConfigError

        raise ConfigError(f"unknown keep-components mode {mode!r}: choose one of {', '.join(KEEP_COMPONENTS)}")
    return mode


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    structure = np.ones((3,) * mask.ndim, bool)  # full connectivity: 8 in 2D, 26 in 3D
    return ndimage.label(mask, structure=structure)


def _nearest(components: np.ndarray, count: int, distance: np.ndarray) -> int:
    """The component (1..count) holding the pixel of smallest ``distance``."""
    from scipy import ndimage

    closest = ndimage.minimum(distance, components, index=np.arange(1, count + 1))
    return int(np.argmin(closest)) + 1


def keep_prompted(
    mask: np.ndarray,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
) -> np.ndarray:
    """The components of one (H, W) bool mask that its prompt touches (see the module docstring).

    Args:
        mask: (H, W) bool, the prediction for one prompt set.
        points: (N, 2) clicks in (x, y) pixels of the mask's image; ``labels`` (N,): 1 positive, 0 negative.
        box: (4,) XYXY in pixels of the mask's image.
    """
    mask = np.asarray(mask, bool)
    clicks = np.zeros((0, 2))
    if points is not None and labels is not None:
        clicks = np.asarray(points, np.float64).reshape(-1, 2)[np.asarray(labels).reshape(-1) == 1]
    if not mask.any() or (not len(clicks) and box is None):
        return mask
    components, count = _label(mask)
    if count == 1:
        return mask
    height, width = mask.shape
    keep = np.zeros(count + 1, bool)
    if len(clicks):
        cols = np.clip(np.round(clicks[:, 0]).astype(int), 0, width - 1)
        rows = np.clip(np.round(clicks[:, 1]).astype(int), 0, height - 1)
        keep[components[rows, cols]] = True
    if box is not None:
        x0, y0, x1, y1 = np.asarray(box, np.float64).reshape(4)
        r0, r1 = int(np.clip(np.floor(min(y0, y1)), 0, height)), int(np.clip(np.ceil(max(y0, y1)) + 1, 0, height))
        c0, c1 = int(np.clip(np.floor(min(x0, x1)), 0, width)), int(np.clip(np.ceil(max(x0, x1)) + 1, 0, width))
        keep[np.unique(components[r0:r1, c0:c1])] = True
    keep[0] = False  # background
    if not keep.any():  # nothing touched: the component nearest to the clicks, else to the box
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
        if len(clicks):
            distance = np.min([np.hypot(xx - x, yy - y) for x, y in clicks], axis=0)
        else:
            dx = np.maximum(np.maximum(min(x0, x1) - xx, xx - max(x0, x1)), 0)
            dy = np.maximum(np.maximum(min(y0, y1) - yy, yy - max(y0, y1)), 0)
            distance = np.hypot(dx, dy)
        keep[_nearest(components, count, distance)] = True
    return keep[components]


def keep_prompted_batch(
    masks: np.ndarray,
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
) -> np.ndarray:
    """``keep_prompted`` on a predictor's (P, K, H, W) masks, each prompt set with its own prompts: ``points``
    (N, 2) or (P, N, 2), ``labels`` (N,) or (P, N), ``boxes`` (4,) or (P, 4), as ``Predictor.predict`` takes them
    (in pixels of the masks' image)."""
    masks = np.asarray(masks, bool)
    count = masks.shape[0]
    if points is not None and labels is not None:
        points = np.asarray(points).reshape(-1, np.shape(labels)[-1], 2)
        labels = np.asarray(labels).reshape(-1, np.shape(labels)[-1])
        points = np.broadcast_to(points, (count, *points.shape[1:]))
        labels = np.broadcast_to(labels, (count, labels.shape[1]))
    if boxes is not None:
        boxes = np.broadcast_to(np.asarray(boxes).reshape(-1, 4), (count, 4))
    out = masks.copy()
    for p in range(count):
        for k in range(masks.shape[1]):
            out[p, k] = keep_prompted(
                masks[p, k],
                None if points is None or labels is None else points[p],
                None if points is None or labels is None else labels[p],
                None if boxes is None else boxes[p],
            )
    return out


# ------------------------------------------------------------------------------------------------- 3D, per class
def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a bool mask (any dimension); an empty mask as it is. A tie keeps the
    component found first in array order."""
    mask = np.asarray(mask, bool)
    components, count = _label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def keep_largest(labels: np.ndarray, classes: Collection[int]) -> np.ndarray:
    """A label volume with each class of ``classes`` reduced to its largest connected component (the voxels it
    loses become background); other classes are untouched."""
    out = np.array(labels, copy=True)
    for class_id in classes:
        mask = out == class_id
        out[mask & ~largest_component(mask)] = 0
    return out
