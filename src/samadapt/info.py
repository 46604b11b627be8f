"""What this installation can do (version, device, threads) and where its model weights come from."""

from __future__ import annotations

import platform

import torch

from samadapt import __version__
from samadapt.precision import fast_bfloat16


def describe() -> dict:
    """Version, device, threads and, per model, the weights file it would load (or why none is found)."""
    from samadapt.models.registry import MODELS, default_weights_path

    models = {}
    for name, spec in MODELS.items():
        try:
            weights = str(default_weights_path(name))
        except FileNotFoundError as error:
            weights = f"not found ({error})"
        models[name] = {"input_size": spec.default_img_size, "weights": weights, "about": spec.description}
    return {
        "samadapt": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_bfloat16": fast_bfloat16("cpu"),
        "models": models,
    }
