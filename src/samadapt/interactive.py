"""Interactive segmentation of one object in a volume, on any predictor: a box, then corrective clicks.

The way a user works in a slice viewer, and the way the CVPR 2025 interactive 3D challenge measures a model
(``eval.interactive``): the object's 3D box starts it (its middle slice segmented, the mask propagated slice by slice
through the box's slices: ``prompts.propagate_box``); then each click re-segments its slice with the box and every
click given there so far, and re-propagates to the neighbours, each prompted with the box of its new neighbour's
mask (widened to its own: a click grows the slices after it, never shrinks them) and its own clicks, until a slice
barely changes (``SETTLED_DICE``): the change has died out.

Propagation with memory (``memory=True``): every slice also gets its neighbour's low-resolution logits as SAM's
mask prompt, and a clicked slice its own previous logits (SAM's interactive practice). Off by default: LiteMedSAM was
trained with boxes only, and whether memory pays is the protocol's to show (docs/interactive.md).

Slices are (H, W) planes of a (Z, H, W) stack taken along the volume's slicing axis; ``encode(index)`` puts slice
``index`` into the predictor (the caller decides how: preprocessing, cache keys). numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from samadapt.prediction import SegmentationPredictor
from samadapt.prompts import Click, SliceMask, box_from_mask, grow_box, propagate_box

SETTLED_DICE = 0.98  # a re-propagated slice at least this close to its mask before ends the re-propagation
CLICKS_AS = ("points", "box")
MARGIN = 2.0  # pixels a propagated box is grown by: without it, boxes drawn on under-segmented slices shrink away


def edit_box(box: np.ndarray | None, click: Click, margin: float, shape: tuple[int, int]) -> np.ndarray | None:
    """A box edited by a click as a user drags its edges: a positive click outside it pulls the nearest edges out to
    it (``margin`` pixels beyond, within the slice); a negative click inside it pushes the edge nearest to it in,
    one pixel past the click. None stays None unless the click is positive (a box around it)."""
    x, y = click.x, click.y
    if box is None:
        return grow_box(np.array([x, y, x, y], np.float32), margin, shape) if click.positive else None
    x0, y0, x1, y1 = (float(v) for v in box)
    if click.positive:
        grown = np.array([min(x0, x - margin), min(y0, y - margin), max(x1, x + margin), max(y1, y + margin)])
        return np.clip(grown, 0, np.array([shape[1] - 1, shape[0] - 1] * 2)).astype(np.float32)
    if not (x0 <= x <= x1 and y0 <= y <= y1):
        return np.asarray(box, np.float32)
    gaps = {"left": x - x0, "top": y - y0, "right": x1 - x, "bottom": y1 - y}
    side = min(gaps, key=gaps.get)
    x0, y0, x1, y1 = (
        x + 1 if side == "left" else x0,
        y + 1 if side == "top" else y0,
        x - 1 if side == "right" else x1,
        y - 1 if side == "bottom" else y1,
    )
    return None if x0 > x1 or y0 > y1 else np.array([x0, y0, x1, y1], np.float32)


def ask(
    predictor: SegmentationPredictor,
    box: np.ndarray | None,
    clicks: Sequence[Click] = (),
    previous: SliceMask | None = None,
    memory: bool = False,
) -> SliceMask:
    """One slice's answer (its image already set) to a box and clicks; with ``memory``, ``previous``'s logits (a
    neighbour's, or the slice's own) as the mask prompt."""
    points = labels = None
    if clicks:
        points = np.array([[c.x, c.y] for c in clicks], np.float32)
        labels = np.array([int(c.positive) for c in clicks])
    mask_input = previous.logits if memory and previous is not None else None
    answer = predictor.predict(points=points, labels=labels, boxes=box, mask_input=mask_input)
    return SliceMask(answer.masks[0, 0], float(answer.scores[0, 0]), answer.low_res_logits[0])


def slice_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks, 1.0 when both are empty: how much a re-propagated slice changed."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def widen_to(box: np.ndarray, own: np.ndarray | None) -> np.ndarray:
    """``box`` widened to cover ``own`` (a slice's current box; None leaves ``box`` as it is): a neighbour
    re-propagated after a click keeps at least the box it had, so a trimming click does not shrink it."""
    if own is None:
        return np.asarray(box, np.float32)
    return np.concatenate([np.minimum(box[:2], own[:2]), np.maximum(box[2:], own[2:])]).astype(np.float32)


class VolumeObject:
    """One object being segmented in a (Z, H, W) stack: its mask, the model's answer and the clicks per slice.

    Args:
        predictor: any backend's (``inference.load_predictor``).
        encode: ``encode(index)`` sets slice ``index``'s image in ``predictor``.
        shape: (Z, H, W) of the stack.
        memory: propagate with the neighbour's logits as mask prompt (module docstring).
        min_score: a propagated slice whose IoU estimate is below it counts as empty (``propagate_box``).
        margin: pixels each propagated box is grown by (``propagate_box``).
        clicks_as: ``points`` (SAM's prompts, beside the box; on abdomen_ct's 8 organs with the un-adapted
            LiteMedSAM, Dice 0.572 -> 0.662 after 5 clicks) or ``box`` (each click edits the slice's box and the box
            alone is the prompt: 0.572 -> 0.649; docs/interactive.md).
    """

    def __init__(
        self,
        predictor: SegmentationPredictor,
        encode: Callable[[int], None],
        shape: tuple[int, int, int],
        memory: bool = False,
        min_score: float | None = None,
        margin: float = MARGIN,
        clicks_as: str = "points",
    ) -> None:
        if clicks_as not in CLICKS_AS:
            raise ValueError(f"clicks_as must be one of {', '.join(CLICKS_AS)}, got {clicks_as!r}")
        self.predictor, self.encode, self.memory, self.min_score = predictor, encode, memory, min_score
        self.margin, self.clicks_as = margin, clicks_as
        self.box: np.ndarray | None = None
        self.mask = np.zeros(shape, bool)
        self.answers: dict[int, SliceMask] = {}
        self.boxes: dict[int, np.ndarray | None] = {}  # the box each slice was last segmented with
        self.clicks: dict[int, list[Click]] = {}
        self.first, self.last = 0, shape[0] - 1

    def _segment(self, index: int, box: np.ndarray | None, previous: SliceMask | None) -> SliceMask:
        self.encode(index)
        self.boxes[index] = box
        clicks = self.clicks.get(index, ()) if self.clicks_as == "points" else ()
        answer = ask(self.predictor, box, clicks, previous, self.memory)
        self.answers[index] = answer
        return answer

    def _write(self, index: int, mask: np.ndarray) -> None:
        self.mask[index] = mask

    def _resegment(self, index: int, box: np.ndarray, previous: SliceMask | None) -> SliceMask:
        """A neighbour re-propagated after a click: its box is the new neighbour's, widened to the box it was last
        segmented with, so a click that grows the object carries into the next slices while one that trims it
        leaves them as they were (a box drawn from one slice's mask cannot take away what the next slice rightly
        holds), and a slice whose box does not change comes back as it was: the change has died out."""
        return self._segment(index, widen_to(box, self.boxes.get(index)), previous)

    def start(self, first: int, last: int, box: np.ndarray, middle: int | None = None) -> list[int]:
        """Segment the object from its 3D box: slices ``first``..``last``, ``box`` XYXY on slice ``middle`` (default
        the middle one), where it starts; each other slice gets the box of its neighbour's mask. Returns the slices
        that hold the object, in the order segmented."""
        self.first, self.last = max(first, 0), min(last, self.mask.shape[0] - 1)
        middle = (self.first + self.last) // 2 if middle is None else middle
        self.box = np.asarray(box, np.float32)
        return propagate_box(
            self._segment,
            self._write,
            middle,
            self.box,
            self.first,
            self.last,
            min_score=self.min_score,
            margin=self.margin,
        )

    def _click_box(self, index: int) -> np.ndarray | None:
        """The box a clicked slice is re-segmented with. ``clicks_as="box"``: the current mask's box (else the
        user's), edited by each click in turn (``edit_box``). ``"points"``: the user's box, widened to the slice's
        current mask and its positive clicks; outside the box's slices, the box of the current mask and the positive
        clicks; None without any."""
        if self.clicks_as == "box":
            box = box_from_mask(self.mask[index])
            if box is None and self.box is not None and self.first <= index <= self.last:
                box = self.box
            for click in self.clicks.get(index, ()):
                box = edit_box(box, click, self.margin, self.mask.shape[1:])
            return box
        corners = [(c.x, c.y) for c in self.clicks.get(index, ()) if c.positive]
        if self.box is not None and self.first <= index <= self.last:
            corners += [tuple(self.box[:2]), tuple(self.box[2:])]
        current = box_from_mask(self.mask[index])
        if current is not None:
            corners += [tuple(current[:2]), tuple(current[2:])]
        if not corners:
            return None
        xs, ys = [c[0] for c in corners], [c[1] for c in corners]
        return np.array([min(xs), min(ys), max(xs), max(ys)], np.float32)

    def click(self, index: int, click: Click) -> list[int]:
        """Add a click on slice ``index``: that slice re-segmented with its box (``_click_box``) and all its clicks,
        then the neighbours re-propagated until the change dies out; returns the slices that hold the object after
        it, in the order segmented (the clicked one first)."""
        self.clicks.setdefault(index, []).append(click)
        answer = self._segment(index, self._click_box(index), self.answers.get(index))
        self._write(index, answer.mask)
        changed = [index]
        box = box_from_mask(answer.mask)
        if box is None:  # the click emptied its slice: nothing to carry to the neighbours
            return changed

        def settled(i: int, mask: np.ndarray) -> bool:
            return slice_agreement(mask, self.mask[i]) >= SETTLED_DICE

        first, last = (self.first, self.last) if self.first <= index <= self.last else (index, index)
        changed += propagate_box(
            self._resegment,
            self._write,
            index,
            grow_box(box, self.margin, answer.mask.shape),
            first,
            last,
            include_start=False,
            min_score=self.min_score,
            start_answer=answer,
            settled=settled,
            margin=self.margin,
        )
        return changed
