"""Learning-rate schedules, stepped per optimiser step: linear warm-up, then poly, exponential, cosine or constant."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from samadapt.errors import ConfigError

SCHEDULES = ("poly", "exponential", "cosine", "constant")


def lr_factor(
    step: int, total_steps: int, kind: str, warmup_steps: int = 0, power: float = 0.9, final_ratio: float = 0.01
) -> float:
    """Multiplier of the base learning rate after ``step`` optimiser steps.

    Warm-up rises linearly from 1 / (warmup + 1) to 1. After it: ``poly`` (1 - t)^power (SAMed), ``exponential``
    reaching ``final_ratio`` at the last step (Cheap Lunch), ``cosine`` down to ``final_ratio``, ``constant``.
    """
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(total_steps - warmup_steps, 1)
    t = min((step - warmup_steps) / decay_steps, 1.0)
    if kind == "poly":
        return (1.0 - t) ** power
    if kind == "exponential":
        return final_ratio**t
    if kind == "cosine":
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def build_scheduler(optimizer: Optimizer, total_steps: int, kind: str, **kwargs: float) -> LambdaLR:
    lr_factor(0, total_steps, kind, **kwargs)  # validate the arguments now, not at the first step
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, kind, **kwargs))
