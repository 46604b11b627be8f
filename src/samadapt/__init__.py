"""samadapt: adapt the Segment Anything Model to medical image segmentation (MSA, SAMed, Cheap Lunch)."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# the public API, imported on first use so that `import samadapt` stays light
_LAZY = {
    "build_model": "samadapt.models.registry",
    "list_models": "samadapt.models.registry",
    "Predictor": "samadapt.predict",
    "load_predictor": "samadapt.inference",
    "load_run": "samadapt.runs",
    "Run": "samadapt.runs",
    "PeftConfig": "samadapt.peft",
    "apply_peft": "samadapt.peft",
    "TrainConfig": "samadapt.train.config",
    "train": "samadapt.train.api",
    "evaluate": "samadapt.eval.evaluate",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'samadapt' has no attribute {name!r}")
