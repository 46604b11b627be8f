"""Simulated prompts from ground-truth masks: clicks and boxes, as a user would give them.

Coordinates are (x, y) = (column, row) pixels; boxes are XYXY with inclusive pixel bounds. Everything random takes a
``numpy.random.Generator`` so that the same seed gives the same prompts (the baseline and the adapted model are
evaluated on identical prompts). An empty mask has no object to click on: click functions return None and
``box_from_mask`` returns None; callers decide what an empty slice means (the reference code crashed here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
from scipy import ndimage


class Click(NamedTuple):
    x: float
    y: float
    positive: bool


def random_click(mask: np.ndarray, rng: np.random.Generator) -> Click | None:
    """A uniformly random pixel of the object; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    i = int(rng.integers(len(xs)))
    return Click(float(xs[i]), float(ys[i]), True)


def centre_click(mask: np.ndarray) -> Click | None:
    """The object pixel farthest from its boundary (ties: the first in row-major order); None for an empty mask.

    The image border counts as boundary (the mask is padded), so an object cut by the border is clicked inside.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return Click(float(x), float(y), True)


def error_regions(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """The largest connected error region and whether it is a miss (True) or a false positive (False)."""
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    best: tuple[int, np.ndarray, bool] | None = None
    for error, positive in ((gt & ~pred, True), (pred & ~gt, False)):
        components, count = ndimage.label(error)
        if count == 0:
            continue
        sizes = ndimage.sum_labels(error, components, index=range(1, count + 1))
        largest = int(np.argmax(sizes))
        if best is None or sizes[largest] > best[0]:
            best = (int(sizes[largest]), components == largest + 1, positive)
    return None if best is None else (best[1], best[2])


def corrective_click(gt: np.ndarray, pred: np.ndarray, rng: np.random.Generator | None = None) -> Click | None:
    """A click in the largest error region of ``pred``: positive in a miss, negative in a false positive.

    At the region's centre (farthest from its boundary), as a careful user clicks; with ``rng``, at a random pixel
    of the region instead (training variety). None when the prediction is already perfect.
    """
    found = error_regions(gt, pred)
    if found is None:
        return None
    region, positive = found
    click = random_click(region, rng) if rng is not None else centre_click(region)
    return Click(click.x, click.y, positive)


def n_clicks(mask: np.ndarray, n: int, rng: np.random.Generator, centre_first: bool = True) -> list[Click]:
    """``n`` positive clicks on the object: the centre click first (if asked), then random pixels."""
    clicks = []
    first = centre_click(mask) if centre_first else random_click(mask, rng)
    if first is None:
        return []
    clicks.append(first)
    while len(clicks) < n:
        clicks.append(random_click(mask, rng))
    return clicks


def iterative_clicks(
    gt: np.ndarray, predict: Callable[[list[Click]], np.ndarray], n: int
) -> tuple[list[Click], np.ndarray | None]:
    """The evaluation protocol ``point:n``: the centre click, then n - 1 corrective clicks, each placed in the
    largest error region of the prediction made with the clicks so far. Returns the clicks and the last prediction.
    """
    first = centre_click(gt)
    if first is None:
        return [], None
    clicks = [first]
    prediction = predict(clicks)
    while len(clicks) < n:
        click = corrective_click(gt, prediction)
        if click is None:
            break
        clicks.append(click)
        prediction = predict(clicks)
    return clicks, prediction


def box_from_mask(mask: np.ndarray, jitter: int = 0, rng: np.random.Generator | None = None) -> np.ndarray | None:
    """The tight XYXY box of the object, each side moved by up to ``jitter`` pixels at random, clipped to the image.

    Returns a float32 array (4,), or None for an empty mask.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)
    if jitter > 0:
        rng = rng if rng is not None else np.random.default_rng()
        box += rng.integers(-jitter, jitter + 1, size=4).astype(np.float32)
        h, w = mask.shape[:2]
        box[[0, 2]] = np.clip(box[[0, 2]], 0, w - 1)
        box[[1, 3]] = np.clip(box[[1, 3]], 0, h - 1)
        box[:2], box[2:] = np.minimum(box[:2], box[2:]), np.maximum(box[:2], box[2:])
    return box


def objects(
    label: np.ndarray, classes: list[int] | None = None, mode: str = "class"
) -> Iterator[tuple[int, np.ndarray]]:
    """(class id, binary mask) per object of a label map: one per class present, or per connected component."""
    if mode not in ("class", "instance"):
        raise ValueError(f"objects mode must be 'class' or 'instance', got {mode!r}")
    present = [int(c) for c in np.unique(label) if c != 0]
    for c in present if classes is None else [c for c in classes if c in present]:
        mask = label == c
        if mode == "class":
            yield c, mask
            continue
        components, count = ndimage.label(mask)
        for i in range(1, count + 1):
            yield c, components == i
