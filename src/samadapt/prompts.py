"""Simulated prompts from ground-truth masks: clicks and boxes, as a user would give them.

Masks are 2D arrays (H, W) = (rows, columns); anything non-zero is the object. Coordinates are (x, y) =
(column, row) pixels; boxes are XYXY (x_min, y_min, x_max, y_max) with inclusive pixel bounds. Everything random takes
a ``numpy.random.Generator`` so that the same seed gives the same prompts (the baseline and the adapted model are
evaluated on identical prompts).

Empty masks: a slice without the target has no object to click on. The click functions return None, ``n_clicks``
and ``iterative_clicks`` return no clicks, ``box_from_mask`` returns None and ``objects`` yields nothing; callers
decide what an empty slice means (the reference code crashed here with "ValueError: high <= 0").

Propagation (``propagate_box``) carries one object through a volume slice by slice, each slice prompted with the box
of its neighbour's mask (and, with memory, its low-resolution logits: the caller's ``segment`` decides); the model is
a callable, so the same loop serves ``predict_volume``, the interactive evaluation and the app. Corrective clicks on
a volume (``corrective_click_3d``) follow the CVPR 2025 interactive challenge: the largest 3D error component.

Connected components (instances, error regions) use 8-connectivity: pixels touching by a corner are one object,
as they look on screen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)
_TWENTY_SIX = np.ones((3, 3, 3), dtype=bool)


class Click(NamedTuple):
    """A click at pixel (x, y) = (column, row); ``positive`` True adds to the object, False removes."""

    x: float
    y: float
    positive: bool


def _as_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.ndim != 2:
        raise ValueError(f"prompts need a 2D (H, W) mask, got shape {mask.shape}")
    return mask


def random_click(mask: np.ndarray, rng: np.random.Generator) -> Click | None:
    """A uniformly random pixel of the object (positive); None for an empty mask."""
    ys, xs = np.nonzero(_as_mask(mask))
    if len(xs) == 0:
        return None
    i = int(rng.integers(len(xs)))
    return Click(float(xs[i]), float(ys[i]), True)


def centre_click(mask: np.ndarray) -> Click | None:
    """The object pixel farthest from its boundary (positive; ties: the first in row-major order); None if empty.

    Distances are Euclidean, to the nearest background pixel; the image border counts as boundary (the mask is
    padded by one background pixel), so an object cut by the border is clicked inside, away from the cut.
    """
    mask = _as_mask(mask)
    if not mask.any():
        return None
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return Click(float(x), float(y), True)


def n_clicks(
    mask: np.ndarray, n: int, rng: np.random.Generator | None = None, centre_first: bool = True
) -> list[Click]:
    """``n`` positive clicks on the object: the centre click first (if ``centre_first``), then distinct random
    pixels (repeats only when the object has fewer than ``n`` pixels). An empty mask or ``n <= 0`` gives [].
    """
    mask = _as_mask(mask)
    if n <= 0 or not mask.any():
        return []
    rng = rng if rng is not None else np.random.default_rng()
    first = centre_click(mask) if centre_first else random_click(mask, rng)
    clicks = [first]
    ys, xs = np.nonzero(mask)
    pool = [i for i in range(len(xs)) if (xs[i], ys[i]) != (first.x, first.y)]
    if n > 1 and pool:
        picks = rng.choice(pool, size=n - 1, replace=len(pool) < n - 1)
        clicks += [Click(float(xs[i]), float(ys[i]), True) for i in picks]
    while len(clicks) < n:  # a one-pixel object: the same pixel again
        clicks.append(first)
    return clicks


def error_region(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """The largest connected error region of ``pred`` against ``gt`` (both (H, W)), and whether it is a miss
    (``gt & ~pred``: True) or a false positive (``pred & ~gt``: False); on equal size the miss wins.
    None when ``pred`` equals ``gt``.
    """
    gt, pred = _as_mask(gt), _as_mask(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    best: tuple[int, np.ndarray, bool] | None = None
    for error, positive in ((gt & ~pred, True), (pred & ~gt, False)):
        components, count = ndimage.label(error, structure=_EIGHT)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())[1:]
        largest = int(np.argmax(sizes))
        if best is None or sizes[largest] > best[0]:
            best = (int(sizes[largest]), components == largest + 1, positive)
    return None if best is None else (best[1], best[2])


def corrective_click(gt: np.ndarray, pred: np.ndarray, rng: np.random.Generator | None = None) -> Click | None:
    """A click in the largest error region of ``pred``: positive in a miss, negative in a false positive.

    Without ``rng``, at the region's centre (farthest from its boundary), as a careful user clicks; with ``rng``,
    at a random pixel of the region (variety for training). None when the prediction is already perfect.
    """
    found = error_region(gt, pred)
    if found is None:
        return None
    region, positive = found
    click = random_click(region, rng) if rng is not None else centre_click(region)
    return Click(click.x, click.y, positive)


def iterative_clicks(
    gt: np.ndarray,
    predict: Callable[[list[Click]], np.ndarray],
    n: int,
    rng: np.random.Generator | None = None,
    first: str = "centre",
) -> tuple[list[Click], np.ndarray | None]:
    """The interactive protocol ``point:n``: a first click, then up to n - 1 corrective clicks, each placed in the
    largest error region of the prediction made with all clicks so far (stops early once the prediction is perfect).

    Args:
        gt: (H, W) target mask.
        predict: clicks so far -> (H, W) boolean prediction.
        n: number of clicks at most.
        rng: with a generator, corrective clicks land on random pixels of the error region (training), and
            ``first="random"`` can use it; without, every click is at a region's centre (evaluation).
        first: ``"centre"`` (farthest from the boundary) or ``"random"``.

    Returns:
        The clicks and the last prediction; ([], None) for an empty ``gt`` or ``n <= 0`` (``predict`` not called).
    """
    if first not in ("centre", "random"):
        raise ValueError(f"first click must be 'centre' or 'random', got {first!r}")
    if n <= 0:
        return [], None
    start = centre_click(gt) if first == "centre" else random_click(gt, rng or np.random.default_rng())
    if start is None:
        return [], None
    clicks = [start]
    prediction = predict(clicks)
    while len(clicks) < n:
        click = corrective_click(gt, prediction, rng)
        if click is None:
            break
        clicks.append(click)
        prediction = predict(clicks)
    return clicks, prediction


def clicks_to_arrays(clicks: Sequence[Click]) -> tuple[np.ndarray, np.ndarray]:
    """Clicks -> (coords (N, 2) float32 in (x, y) order, labels (N,) int64 with 1 positive / 0 negative)."""
    coords = np.array([[c.x, c.y] for c in clicks], dtype=np.float32).reshape(-1, 2)
    labels = np.array([1 if c.positive else 0 for c in clicks], dtype=np.int64)
    return coords, labels


def box_from_mask(mask: np.ndarray, jitter: int = 0, rng: np.random.Generator | None = None) -> np.ndarray | None:
    """The tight XYXY box of the object, each side moved independently by up to ``jitter`` pixels at random,
    clipped to the image (0 <= x <= W - 1, 0 <= y <= H - 1).

    Returns a float32 array (4,) = (x_min, y_min, x_max, y_max), or None for an empty mask.
    """
    ys, xs = np.nonzero(_as_mask(mask))
    if len(xs) == 0:
        return None
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)
    if jitter > 0:
        rng = rng if rng is not None else np.random.default_rng()
        box += rng.integers(-jitter, jitter + 1, size=4).astype(np.float32)
        h, w = np.shape(mask)[:2]
        box[[0, 2]] = np.clip(box[[0, 2]], 0, w - 1)
        box[[1, 3]] = np.clip(box[[1, 3]], 0, h - 1)
        box[:2], box[2:] = np.minimum(box[:2], box[2:]), np.maximum(box[:2], box[2:])  # tiny objects may cross
    return box


def grow_box(box: np.ndarray, margin: float, shape: tuple[int, int]) -> np.ndarray:
    """An XYXY ``box`` grown by ``margin`` pixels on every side, clipped to an (H, W) image of ``shape``."""
    if not margin:
        return box
    height, width = shape
    grown = np.asarray(box, np.float32) + np.array([-margin, -margin, margin, margin], np.float32)
    return np.clip(grown, 0, np.array([width - 1, height - 1] * 2, np.float32))


def objects(
    label: np.ndarray, classes: Sequence[int] | None = None, mode: str = "class"
) -> Iterator[tuple[int, np.ndarray]]:
    """(class id, binary (H, W) mask) per object of a label map, classes in increasing order.

    ``mode="class"``: one mask per class present; ``"instance"``: one per 8-connected component of each class.
    ``classes`` restricts to those ids; absent classes (and an all-background label) yield nothing.
    """
    if mode not in ("class", "instance"):
        raise ValueError(f"objects mode must be 'class' or 'instance', got {mode!r}")
    label = np.asarray(label)
    present = [int(c) for c in np.unique(label) if c != 0]
    wanted = present if classes is None else sorted(set(int(c) for c in classes) & set(present))
    for c in wanted:
        mask = label == c
        if mode == "class":
            yield c, mask
            continue
        components, count = ndimage.label(mask, structure=_EIGHT)
        for i in range(1, count + 1):
            yield c, components == i


class SliceMask(NamedTuple):
    """One slice's answer during propagation: the (H, W) bool ``mask``, the model's IoU estimate ``score`` (None: not
    the model's, e.g. a mask the user drew, never below a ``min_score``) and its low-resolution ``logits``
    ((1, s/4, s/4) in the predictor's array type; None when not the model's): the memory the next slice may take
    as its mask prompt."""

    mask: np.ndarray
    score: float | None = None
    logits: Any = None


def propagate_box(
    segment: Callable[[int, np.ndarray, SliceMask | None], SliceMask],
    write: Callable[[int, np.ndarray], None],
    start: int,
    box: np.ndarray,
    first: int,
    last: int,
    *,
    include_start: bool = True,
    min_score: float | None = None,
    guard: AbstractContextManager | None = None,
    start_answer: SliceMask | None = None,
    settled: Callable[[int, np.ndarray], bool] | None = None,
    margin: float = 0.0,
) -> list[int]:
    """Carry one object through slices ``first``..``last`` (inclusive), forward from ``start`` then backward, each
    slice prompted with the XYXY box of its neighbour's mask (LiteMedSAM's way) and given the neighbour's answer
    (``segment``'s third argument: its logits are the memory a caller may pass as SAM's mask prompt).

    Both directions begin from ``box``. With ``include_start`` the forward pass segments ``start`` itself and the
    backward pass begins at ``start - 1`` with the start slice's answer as its neighbour (``predict_volume``: a volume
    box, its middle slice first); without it both begin next to ``start``, with ``start_answer`` as the neighbour
    (the app and the interactive evaluation: ``start`` already holds a mask and ``box`` is that mask's box).

    A direction stops at the first slice whose mask is empty, or, with ``min_score``, whose ``score`` is below it (the
    model doubts its mask: the object has ended; the app uses 0.5); that slice is still written, with an empty mask,
    so a caller that replaces the object's pixels clears them there. With ``settled``, it also stops after a slice
    for which ``settled(index, new_mask)`` (asked before ``write``) says the change has died out. It also stops
    past ``first`` / ``last``.

    ``margin`` grows each propagated box by that many pixels on every side (clipped to the slice): a box drawn
    tight on an under-segmented neighbour can only shrink from slice to slice, one with room lets an organ that
    widens be followed.

    Args:
        segment: (slice index, box (4,) float32, the neighbour's answer or None) -> ``SliceMask``.
        write: (slice index, (H, W) bool mask) -> None; called for every slice visited, in order.
        guard: held around each slice's ``segment`` and ``write`` (the app's session lock, so that no edit of the
            user lands between the two).

    Returns:
        The slices written with a non-empty mask, in the order visited.
    """
    guard = guard if guard is not None else nullcontext()
    written = []
    for step in (1, -1):
        current = np.asarray(box, np.float32)
        previous = start_answer
        index = start if include_start and step == 1 else start + step
        while first <= index <= last:
            with guard:
                answer = segment(index, current, previous)
                if min_score is not None and answer.score is not None and answer.score < min_score:
                    answer = SliceMask(np.zeros_like(answer.mask), answer.score)
                done = settled is not None and settled(index, answer.mask)
                write(index, answer.mask)
            if include_start and step == 1 and index == start:
                start_answer = answer  # the backward pass's neighbour
            current = box_from_mask(answer.mask)
            if current is None:
                break
            current = grow_box(current, margin, answer.mask.shape)
            written.append(index)
            if done:
                break
            previous = answer
            index += step
    return written


def corrective_click_3d(gt: np.ndarray, pred: np.ndarray, axis: int = 0) -> tuple[int, Click] | None:
    """Where a user corrects a volume: the largest 3D error component (26-connected, as the CVPR 2025 interactive
    challenge), on the slice along ``axis`` where that component is largest, at its point farthest from the
    component's edge on that slice (``centre_click``); positive in a miss, negative in a false positive.

    The challenge clicks the 3D centre (farthest from the component's 3D edge); a 2D model answers a click on one
    slice, so the click goes to the slice that holds most of the error. Returns (slice index, click), or None when
    ``pred`` equals ``gt``.
    """
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape or gt.ndim != 3:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} must be one (Z, H, W) shape")
    components, count = ndimage.label(gt != pred, structure=_TWENTY_SIX)
    if count == 0:
        return None
    sizes = np.bincount(components.ravel())[1:]
    component = np.moveaxis(components == int(np.argmax(sizes)) + 1, axis, 0)
    index = int(np.argmax(component.sum(axis=(1, 2))))
    click = centre_click(component[index])
    positive = bool(np.moveaxis(gt, axis, 0)[index][int(click.y), int(click.x)])
    return index, Click(click.x, click.y, positive)
