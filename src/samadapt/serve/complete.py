"""Complete the volume from the slices the user finished (the app's ``samadapt complete``): a background job that
adapts a semantic run on those slices (``samadapt.complete.complete_volume``, the same path as the command) and
writes its labels into the other slices.

What the user decided is never overwritten: every voxel of a finished slice (along any axis) is kept; on the other
slices the completion fills only unlabelled voxels (labels a propagation put there stay) unless ``overwrite``, which
replaces them by the completion's. One undo step.
"""

from __future__ import annotations

import time

import numpy as np

from samadapt.data.io import Volume
from samadapt.serve.adapt import follow_training


def given_slices(session, axis: int) -> list[int]:
    """The finished slices along ``axis`` (the completion's training slices).

    Raises:
        ValueError: none of them holds a label.
    """
    given = sorted(i for a, i in session.finished if a == axis)
    if not any(session.plane(axis, i).any() for i in given):
        raise ValueError(f"no finished slice along axis {axis} holds a label: label a few slices first")
    return given


def finished_voxels(session) -> np.ndarray:
    """(Z, Y, X) bool: the voxels of every slice the user finished, along any axis."""
    kept = np.zeros(session.labels.shape, bool)
    for axis, index in session.finished:
        np.moveaxis(kept, axis, 0)[index] = True
    return kept


def complete_job(workspace, session, axis: int, steps: int, overwrite: bool, job) -> dict:
    """Adapt the semantic recipe for ``steps`` steps on the finished slices along ``axis`` (from the page's base
    model), label the volume with it and write the result where the user's labels allow (module docstring)."""
    from samadapt.complete import complete_volume

    with session.lock:
        given = given_slices(session, axis)
        labels = Volume(session.labels.copy(), session.volume.spacing, session.volume.affine, path=session.path)
        planes = np.moveaxis(labels.array, axis, 0)
        present = sorted(int(v) for v in np.unique(planes[given]) if v > 0)
        classes = {v: session.objects[v]["name"] for v in present}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = workspace.state_dir / "complete" / f"{session.path.name.split('.')[0]}-{stamp}-{job.id}" / "run"
    job.total = int(steps)
    with follow_training(run_dir, job):
        job.message = f"training on {len(given)} slices"
        predicted = complete_volume(
            session.volume,
            labels,
            run_dir=run_dir,
            steps=int(steps),
            axis=axis,
            slices=given,
            preprocessing=session.preset,
            classes=classes,
            device=workspace.device,
            overrides=[f"model.name={workspace.run.base_model}", "train.log_every=1"],
        )
    with session.lock:  # the user may have finished more slices meanwhile: they are kept too
        writable = ~finished_voxels(session)
        if not overwrite:
            writable &= session.labels == 0
        changed = writable & (session.labels != predicted)
        session.remember("complete", axis, None)
        session.labels[changed] = predicted[changed]
        session.dirty = True
    job.done, job.message = job.total, f"{int(changed.sum())} voxels labelled"
    touched = np.flatnonzero(np.moveaxis(changed, axis, 0).reshape(changed.shape[axis], -1).any(axis=1))
    return {"run": str(run_dir), "given": given, "slices": touched.tolist(), "voxels": int(changed.sum())}
