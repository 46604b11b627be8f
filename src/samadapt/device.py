"""Where to compute: the one place in the library that names a device.

Every entry point (train, evaluate, predict, demo, ``Predictor``) takes ``device=None`` and passes it through
``resolve_device``; ``None`` / ``"auto"`` means the CUDA GPU when one is available (the local rank's GPU under
torchrun), else the CPU. ``autocast`` pairs a resolved device with a resolved precision (``samadapt.precision``);
``distributed_context`` is where a torchrun process learns its rank.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist

from samadapt.errors import ConfigError
from samadapt.precision import resolve_precision


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` / ``"auto"`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; anything else as given.

    Raises:
        ValueError: a CUDA device was asked for on a machine without one (instead of a late, obscure failure).
    """
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this machine has no usable CUDA GPU; use cpu or auto")
    return resolved


def distributed_context() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if world > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` (``auto`` resolved for ``device``); fp32 -> no autocast at all."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
