"""One optimiser step after the gradients are in, the same for every training loop."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def optimizer_step(loop, params: Sequence[torch.nn.Parameter], max_grad_norm: float | None) -> float:
    """Unscale, clip (when ``max_grad_norm``), step the optimiser through the gradient scaler, advance the schedule
    and ``loop.step``; returns the learning rate the step used."""
    if max_grad_norm:
        loop.scaler.unscale_(loop.optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    lr = loop.optimizer.param_groups[0]["lr"]
    loop.scheduler.step()
    loop.step += 1
    return lr
