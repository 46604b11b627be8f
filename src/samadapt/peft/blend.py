"""Weight-space ensembling of an adapted model with its base model (WiSE-FT, Wortsman et al., CVPR 2022).

With blend weight w, every trained update is taken at w: an adapter's (or depth branch's) output and a LoRA update
are scaled by w, and a module trained in full holds base + w * (trained - base). w = 1 is the trained model, w = 0
the base model. Fine-tuned on a handful of slices, the full update fits those slices' modality and look; half of it
keeps most of the gain on them and most of what the base model did elsewhere (docs/accuracy.md, MSA with boxes).

The trained values of fully-trained modules are kept aside while a blend below 1 is active, so going back to 1
restores them exactly and a training loop can validate at its run's blend between steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from samadapt.errors import ConfigError, RunError
from samadapt.peft.adapter import Adapter
from samadapt.peft.lora import LoRALinear


def current_blend(model: nn.Module) -> float:
    """The blend weight ``model`` computes with (1.0: the trained model as saved)."""
    return getattr(model, "peft_blend", 1.0)


def check_blend(weight: float) -> float:
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"blend must be in [0, 1] (1: the trained model, 0: the base model), got {weight}")
    return float(weight)


@torch.no_grad()
def set_blend(model: nn.Module, weight: float) -> nn.Module:
    """Make ``model`` compute with blend ``weight`` (in place; ``set_blend(model, 1.0)`` restores the trained model).

    Raises:
        ConfigError: ``weight`` outside [0, 1]. RunError: a semantic decoder (its K + 1 head has no base to blend
            with), or a model that carries no PEFT modules.
    """
    weight = check_blend(weight)
    if weight == current_blend(model):
        return model
    if getattr(getattr(model, "mask_decoder", None), "semantic", False):
        raise RunError("a semantic run's decoder has K + 1 outputs and no base model to blend with; use blend 1")
    scaled = [m for m in model.modules() if isinstance(m, (Adapter, LoRALinear))]
    if not scaled and not hasattr(model, "peft_base_values"):
        raise RunError("this model carries no PEFT modules: there is nothing to blend")
    for module in scaled:
        merged = isinstance(module, LoRALinear) and module.merged
        if merged:  # the merged update was computed at the old weight
            module.unmerge()
        module.blend = weight
        if merged:
            module.merge()
    params = dict(model.named_parameters())
    base = getattr(model, "peft_base_values", {})
    if current_blend(model) == 1.0:  # the values just trained, taken now: a training loop may have moved them
        model.peft_trained_values = {name: params[name].detach().to("cpu", copy=True) for name in base}
    trained = model.peft_trained_values
    for name, base_value in base.items():
        param = params[name]
        if weight == 1.0:
            param.copy_(trained[name])
        else:
            param.copy_(torch.lerp(base_value.to(param), trained[name].to(param), weight))
    if weight == 1.0:
        del model.peft_trained_values
    model.peft_blend = weight
    return model


@contextmanager
def blended(model: nn.Module, weight: float) -> Iterator[nn.Module]:
    """Within the block ``model`` computes with blend ``weight``; its blend before is put back on exit."""
    before = current_blend(model)
    set_blend(model, weight)
    try:
        yield model
    finally:
        set_blend(model, before)
