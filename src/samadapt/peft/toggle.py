"""Switching a PEFT model back to its base model for a while: the baseline is the same model, adapters off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from samadapt.errors import RunError
from samadapt.peft.adapter import Adapter
from samadapt.peft.depth import DepthBranch
from samadapt.peft.lora import LoRALinear


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes its base model's function: adapters, LoRA and depth branches are off,
    and the modules a recipe trains in full (SAMed's decoder, Cheap Lunch's IoU head) hold their base values again.

    The adapted values are put back on exit, also after an error. Without PEFT modules the model is yielded as is.

    Raises:
        RunError: the decoder was rebuilt for a semantic run (K + 1 outputs): its base is another model.
    """
    if getattr(getattr(model, "mask_decoder", None), "semantic", False):
        raise RunError("a semantic run's decoder has K + 1 outputs; its baseline is the base model, loaded apart")
    switches = [m for m in model.modules() if isinstance(m, (Adapter, DepthBranch, LoRALinear))]
    merged = [m for m in switches if isinstance(m, LoRALinear) and m.merged]
    base_values = getattr(model, "peft_base_values", {})
    params = dict(model.named_parameters())
    adapted = {}
    try:
        with torch.no_grad():
            for module in merged:
                module.unmerge()
            for module in switches:
                module.enabled = False
            for name, value in base_values.items():
                adapted[name] = params[name].detach().clone()
                params[name].copy_(value)
        yield model
    finally:
        with torch.no_grad():
            for name, value in adapted.items():
                params[name].copy_(value)
            for module in switches:
                module.enabled = True
            for module in merged:
                module.merge()
