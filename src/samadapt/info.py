"""``samadapt info``: what this installation can do and where its model weights come from."""

from __future__ import annotations

import argparse
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


def run(args: argparse.Namespace) -> int:
    facts = describe()
    for key, value in facts.items():
        if key != "models":
            print(f"{key:14s} {value}")
    print("models:")
    for name, model in facts["models"].items():
        print(f"  {name:13s} input {model['input_size']:4d}  {model['about']}")
        print(f"  {'':13s} weights: {model['weights']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="version, device, available models and their weights")
    parser.set_defaults(func=run)
