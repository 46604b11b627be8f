"""Annotate -> adapt: the slices the user finished become a training set (MSD layout), a recipe trains on it through
``samadapt.train.api.train`` in a background job, and the page switches to the new run (the previous model stays in
the model list, one click away).

The training set holds one case per finished slice, a (1, H, W) NIfTI of the slice's stored intensities with the
slice's labels, and the case's preset in dataset.json. Slice-wise presets, CT windows and colour are exact; a
volume-wise MR preset (``mr``, ``minmax``) becomes ``percentile_slice`` there, since a lone slice has no volume.
"""

from __future__ import annotations

import csv
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from samadapt.data.dataset_writer import write_msd_dataset
from samadapt.data.io import Volume, write_label
from samadapt.data.preprocess import CT_WINDOWS, SLICE_WISE

RECIPES = ("cheap-lunch", "msa")


def training_set(session, folder: Path) -> Path:
    """Write the finished slices of ``session`` as an MSD dataset in ``folder``; returns it.

    Raises:
        ValueError: no finished slice holds a label.
    """
    picked = [(a, i) for a, i in sorted(session.finished) if session.plane(a, i).any()]
    if not picked:
        raise ValueError("no finished slice holds a label: segment some slices first")
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    spacing = session.volume.spacing
    training = []
    for axis, index in picked:
        raw = session.raw(axis, index).astype(np.float32)
        rows, cols = (spacing[k] for k in range(3) if k != axis)
        affine = np.diag([cols, rows, 1.0, 1.0])
        image = Volume(raw[None], (1.0, rows, cols), affine)
        name = f"slice_a{axis}_{index:04d}.nii.gz"
        _write_image(image, folder / "imagesTr" / name)
        write_label(image, session.plane(axis, index)[None].astype(np.int32), folder / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    preset = session.preset
    if preset not in SLICE_WISE and preset not in CT_WINDOWS and preset != "rgb":
        preset = "percentile_slice"
    present = {int(v) for a, i in picked for v in np.unique(session.plane(a, i)) if v}
    write_msd_dataset(
        folder,
        training,
        {v: session.objects[v]["name"] for v in sorted(present)},
        "CT" if preset in CT_WINDOWS else "MRI",
        preset,
        name=f"samadapt-serve {session.path.name}",
        samadapt_extra={"source": str(session.path)},
    )
    return folder


def _write_image(volume: Volume, path: Path) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(volume.array.transpose(2, 1, 0), volume.affine), str(path))


@contextmanager
def follow_training(run_dir: Path, job) -> Iterator[None]:
    """While the body trains into ``run_dir``, report its last logged step and loss as the job's progress."""
    from samadapt.runs import RunLayout

    done = threading.Event()

    def watch() -> None:
        log = RunLayout(run_dir).metrics_csv
        while not done.wait(0.5):
            if log.exists():
                try:
                    rows = list(csv.DictReader(log.open()))
                except (OSError, csv.Error):
                    continue
                if rows:
                    job.done = int(rows[-1]["step"])
                    job.message = f"step {job.done}, loss {float(rows[-1]['loss']):.3f}"

    threading.Thread(target=watch, daemon=True).start()
    try:
        yield
    finally:
        done.set()


def adapt_job(workspace, session, recipe: str, steps: int, job) -> dict:
    """Build the training set, train ``recipe`` for ``steps`` steps from the page's base model, load the run and
    make it the page's model."""
    from samadapt.inference import load_predictor
    from samadapt.runs import RunLayout, load_run
    from samadapt.train.api import train
    from samadapt.train.config import TrainConfig, layered_config
    from samadapt.train.recipes import recipe_defaults

    if recipe not in RECIPES:
        raise ValueError(f"adapt runs one of {', '.join(RECIPES)}, not {recipe!r}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = workspace.state_dir / "adapt" / f"{session.path.name.split('.')[0]}-{stamp}"
    with session.lock:
        job.message = "building the training set"
        data = training_set(session, base / "data")
    cases = len(json.loads((data / "dataset.json").read_text())["training"])
    flags = {
        "model.name": workspace.run.base_model,
        "data.path": str(data),
        "data.val_cases": 1 if cases > 2 else 0,
        "data.workers": 0,
        "train.steps": int(steps),
        "train.log_every": 1,
        "train.val_every": 0,
        "train.checkpoint_every": 0,
        "train.device": str(workspace.device) if workspace.device else "auto",
        "train.seed": 0,
    }
    config = layered_config(TrainConfig, recipe_defaults(recipe), flags=flags)
    run_dir = base / "run"
    job.total = int(steps)
    with follow_training(run_dir, job):
        job.message = f"training {recipe} on {cases} slices"
        result = train(config, run_dir)
    job.done, job.message = job.total, "loading the adapted model"
    run = load_run(run_dir, checkpoint=RunLayout(run_dir).final_checkpoint(), device=workspace.device)
    workspace.use_predictor(load_predictor(run, device=workspace.device))
    return {"run": str(run_dir), "slices": cases, "steps": result.steps, "val_dice": result.best_val_dice}
