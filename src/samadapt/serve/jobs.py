"""Background jobs of the app, each in its own thread with a progress the page polls: propagation of an object
through the volume, and "adapt" (train a recipe on the finished slices, then switch the page to the new run)."""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from samadapt.interactive import MARGIN, SETTLED_DICE, ask, slice_agreement, widen_to
from samadapt.prompts import SliceMask, box_from_mask, grow_box, propagate_box


@dataclass
class Job:
    """``state``: running, done or failed; ``done`` of ``total`` steps; ``message`` says what it does now."""

    id: str
    kind: str
    total: int = 0
    done: int = 0
    state: str = "running"
    message: str = ""
    result: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "total": self.total,
            "done": self.done,
            "state": self.state,
            "message": self.message,
            "result": self.result,
            "seconds": (self.finished or time.time()) - self.started,
        }


class Jobs:
    """Runs callables ``work(job)`` in daemon threads; a failure becomes ``state == "failed"`` with its message."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}

    def start(self, kind: str, work: Callable[[Job], dict | None]) -> Job:
        job = Job(uuid.uuid4().hex[:12], kind)
        self.jobs[job.id] = job

        def target() -> None:
            try:
                job.result = work(job) or {}
                job.state = "done"
            except Exception as error:  # reported to the page, never lost in a thread
                job.state, job.message = "failed", f"{type(error).__name__}: {error}"
                job.result = {"traceback": traceback.format_exc(limit=5)}
            finally:
                job.finished = time.time()

        threading.Thread(target=target, name=f"samadapt-{kind}-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise KeyError(f"no job {job_id!r}") from None


MIN_SCORE = 0.5


def propagate(
    workspace,
    session,
    axis: int,
    index: int,
    value: int,
    job: Job,
    min_score: float = MIN_SCORE,
    settle: bool = False,
    overwrite: bool = False,
) -> dict:
    """Carry object ``value`` from slice ``index`` through the volume, forward then backward: each next slice is
    prompted with the box of its neighbour's mask (``prompts.propagate_box``, as ``predict.predict_volume``) until the
    mask vanishes, the model's own IoU estimate falls below ``min_score`` (the object has ended: on the demo lesions
    LiteMedSAM scores 0.8-0.9 inside a lesion and < 0.5 beyond it), or the volume ends. One undo step.

    What the user decided is never changed: a slice where the user prompted or erased this object is kept as it is
    (a propagation carries on from its mask, and stops at an erased one); other objects' voxels stay theirs unless
    ``overwrite`` (then this object takes the voxels its mask covers on slices the user did not decide).

    ``settle``: a re-propagation after a corrective click on ``index`` (``interactive.VolumeObject.click``'s rule):
    only over the unbroken run of slices around ``index`` that hold the object (a correction never moves the
    object's ends: **propagate** does), each prompted with its new neighbour's box widened to the
    box of its own current mask (a trimming click leaves the next slices as they were), stopping at the first slice
    that comes back within Dice ``interactive.SETTLED_DICE`` of its current mask: the change has died out."""
    with session.lock:
        start_mask = session.plane(axis, index) == value
        if not start_mask.any():
            raise ValueError(f"object {value} is empty on slice {index}: segment it there first")
        count = session.labels.shape[axis]
        first, last = 0, count - 1
        if settle:  # only over the run of slices that hold the object: a correction never moves its ends
            first, last = index, index
            while first > 0 and (session.plane(axis, first - 1) == value).any():
                first -= 1
            while last < count - 1 and (session.plane(axis, last + 1) == value).any():
                last += 1
            if first == last:
                return {"slices": [], "axis": axis, "object": value}  # nothing was carried from here before
        session.remember("propagate", axis, None)
    job.total = max(last - first, 0)

    def drawn(i: int) -> bool:
        return (value, axis, i) in session.prompts

    def segment(i: int, box: np.ndarray, previous: SliceMask | None) -> SliceMask:
        job.message = f"slice {i}"
        current = session.plane(axis, i) == value
        if drawn(i):
            return SliceMask(current)
        if settle:
            box = widen_to(box, box_from_mask(current))
        with workspace.model_lock:
            workspace.encode(session, axis, i)
            return ask(workspace.predictor, box, previous=previous)

    def settled(i: int, mask: np.ndarray) -> bool:
        return slice_agreement(mask, session.plane(axis, i) == value) >= SETTLED_DICE

    def write(i: int, mask: np.ndarray) -> None:
        if not drawn(i):
            plane = session.plane(axis, i)
            plane[plane == value] = 0
            plane[mask & ((plane == 0) | overwrite)] = value
            session.dirty = True
        job.done += 1

    start_box = box_from_mask(start_mask)
    if settle:  # as VolumeObject.click: room for a click that grew the object to carry on
        start_box = grow_box(start_box, MARGIN, start_mask.shape)
    written = propagate_box(
        segment,
        write,
        index,
        start_box,
        first,
        last,
        include_start=False,
        min_score=min_score,
        guard=session.lock,
        settled=settled if settle else None,
        margin=MARGIN if settle else 0.0,
    )
    job.done = job.total
    job.message = f"{len(written)} slices"
    return {"slices": sorted(written), "axis": axis, "object": value}
