"""The inference seam: the one place that reads a backend's name (``--backend``) and makes its predictor.

Layers, lowest first: ``prediction`` (the ``SegmentationPredictor`` protocol and the one ``Prediction``, numpy
only) <- ``predict`` (the torch ``Predictor``; ``predict_volume`` / ``predict_folder`` over any predictor) and
``export.runtime`` (the torch-free ``OnnxPredictor``) <- this module <- ``eval``, ``serve``, ``cli``. Everything
above takes a predictor object and never asks which backend it runs on.

Backends: ``torch`` is ``Predictor`` on the run's model. ``onnxruntime`` is ``OnnxPredictor`` on an export: the
export directory itself when one is given (``samadapt export --format onnx --out DIR``), otherwise the run (or bare
model) is exported on the fly into a temporary folder, once per model and process, removed at exit. onnxruntime
computes in fp32 on the CPU; ``device`` and ``precision`` apply to the torch backend only.

Example:
    >>> predictor = load_predictor("runs/cl", "onnxruntime")
    >>> labels = predict_volume(predictor.run, volume, boxes=boxes, predictor=predictor)
"""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from samadapt.errors import ConfigError, RunError
from samadapt.export.runtime import ExportedRun, OnnxPredictor, is_export_dir, load_export
from samadapt.predict import Predictor
from samadapt.prediction import Prediction, SegmentationPredictor
from samadapt.runs import baseline, load_run
from samadapt.selection import check_one_click

__all__ = [
    "BACKENDS",
    "Prediction",
    "SegmentationPredictor",
    "baseline_predictor",
    "export_dir_for",
    "load_predictor",
]

BACKENDS = ("torch", "onnxruntime")

_exports: dict[int, tuple[object, Path]] = {}  # id(model) -> (model, export dir): the model is kept alive with it


def load_predictor(
    run_or_export,
    backend: str = "torch",
    device: str | torch.device | None = None,
    precision: str | None = None,
    cache_size: int = 0,
    blend: float | None = None,
    keep_components: str = "all",
    one_click: str | None = None,
) -> SegmentationPredictor:
    """The predictor of a run on ``backend``, with the run it predicts for as its ``run`` attribute.

    Args:
        run_or_export: a run directory or model name (loaded with ``load_run`` at ``blend``: None the run's own),
            an ONNX export directory (onnxruntime only: its ``ExportedRun``), or an already loaded ``Run`` /
            ``ExportedRun``.
        backend: ``torch`` or ``onnxruntime``.
        device, precision: the torch backend's (precision None: the run's own).
        cache_size: how many embeddings ``set_image(..., cache_key=...)`` keeps.
        keep_components: ``"prompt"`` keeps only the mask components a prompt touches (``components``; default all).
        one_click: how one click alone is answered (``selection.ONE_CLICK_RULES``; None: the run's ``one_click``,
            ``best`` unless set); the predictor's run carries it.

    Raises:
        ConfigError: an unknown backend, or ``blend`` with a run already loaded or an export (fixed there).
        RunError: an export directory on the torch backend.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    run = _load(run_or_export, backend, device, blend)
    if one_click is not None:
        run = dataclasses.replace(run, one_click=check_one_click(one_click))
    if backend == "onnxruntime":
        predictor = OnnxPredictor(
            export_dir_for(run),
            cache_size=cache_size,
            select_single_click=run.select_single_click,
            keep_components=keep_components,
        )
        predictor.run = run
        return predictor
    if isinstance(run, ExportedRun):
        raise RunError(f"{run.path} is an ONNX export: it runs on the onnxruntime backend only (--backend onnxruntime)")
    return Predictor.for_run(
        run, device=device, precision=precision, cache_size=cache_size, keep_components=keep_components
    )


def _load(run_or_export, backend: str, device, blend: float | None):
    """A ``Run`` or ``ExportedRun`` from what the caller gave."""
    if not isinstance(run_or_export, (str, Path)):  # loaded already
        if blend is not None:
            raise ConfigError("blend applies to a run loaded here; for a loaded Run use load_run(..., blend=)")
        return run_or_export
    if is_export_dir(run_or_export):
        if backend != "onnxruntime":
            raise RunError(f"{run_or_export} is an ONNX export: use it with --backend onnxruntime")
        if blend is not None:
            raise ConfigError(f"{run_or_export} is an ONNX export: its blend was fixed at export (samadapt export)")
        return load_export(run_or_export)
    return load_run(run_or_export, device=device, blend=blend)


def export_dir_for(run) -> Path:
    """Where ``run``'s ONNX graphs are: its own folder for an ``ExportedRun``, else a cached on-the-fly export."""
    if isinstance(run, ExportedRun):
        return run.path
    key = id(run.model)
    if key not in _exports:
        from samadapt.export.onnx import export_onnx

        folder = Path(tempfile.mkdtemp(prefix="samadapt-onnx-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        export_onnx(run, folder, drop_depth=True)
        _exports[key] = (run.model, folder)
    return _exports[key][1]


@contextmanager
def baseline_predictor(predictor: SegmentationPredictor) -> Iterator[SegmentationPredictor]:
    """The un-adapted model beside ``predictor.run``, on the same backend, device and precision: ``runs.baseline``
    (the same model with its adapters off) on torch; on onnxruntime the base model, exported on the fly."""
    run = predictor.run
    if run is None:
        raise ConfigError("the baseline needs the predictor's run: make the predictor with load_predictor")
    if isinstance(predictor, OnnxPredictor):
        yield load_predictor(run.base_model, "onnxruntime", keep_components=predictor.keep_components)
        return
    with baseline(run, predictor.device) as base:
        yield Predictor.for_run(
            base, device=predictor.device, precision=predictor.precision, keep_components=predictor.keep_components
        )
