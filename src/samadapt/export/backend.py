"""The ``backend`` switch of ``predict_volume`` / ``evaluate`` / ``samadapt predict|evaluate --backend``.

``torch`` is ``samadapt.predict.Predictor`` on the run's model. ``onnxruntime`` is ``OnnxPredictor`` on an export:
the run's own export directory when ``--run`` names one (``samadapt export --format onnx --out DIR``), otherwise
the run (or bare model) is exported on the fly into a temporary folder, once per model and process, removed at exit.
onnxruntime computes in fp32 on the CPU; ``device`` and ``precision`` apply to the torch backend only.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from samadapt.errors import ConfigError, RunError
from samadapt.export.runtime import ExportedRun, OnnxPredictor, is_export_dir, load_export

BACKENDS = ("torch", "onnxruntime")

_exports: dict[int, tuple[object, Path]] = {}  # id(model) -> (model, export dir): the model is kept alive with it


def _check(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def load_for_backend(path_or_model, backend: str = "torch", device=None, blend: float | None = None):
    """A ``Run`` (``load_run``, at ``blend``: None the run's own), or for onnxruntime and an export directory an
    ``ExportedRun`` (its blend was fixed at export)."""
    _check(backend)
    if backend == "onnxruntime" and is_export_dir(path_or_model):
        if blend is not None:
            raise ConfigError(f"{path_or_model} is an ONNX export: its blend was fixed at export (samadapt export)")
        return load_export(path_or_model)
    if is_export_dir(path_or_model):
        raise RunError(f"{path_or_model} is an ONNX export: use it with --backend onnxruntime")
    from samadapt.runs import load_run

    return load_run(path_or_model, device=device, blend=blend)


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


def make_predictor(
    run,
    backend: str = "torch",
    device=None,
    precision: str | None = None,
    cache_size: int = 0,
    keep_components: str = "all",
):
    """The predictor of ``run`` on ``backend`` (``Predictor`` or ``OnnxPredictor``, one interface), answering one
    click as the run was trained (``selection.one_click_best``: an export keeps the run's manifest)."""
    _check(backend)
    if backend == "onnxruntime":
        return OnnxPredictor(
            export_dir_for(run),
            cache_size=cache_size,
            select_single_click=run.select_single_click,
            keep_components=keep_components,
        )
    if isinstance(run, ExportedRun):
        raise RunError(f"{run.path} is an ONNX export: it runs on the onnxruntime backend only")
    from samadapt.predict import Predictor

    return Predictor.for_run(run, device, precision, cache_size=cache_size, keep_components=keep_components)
