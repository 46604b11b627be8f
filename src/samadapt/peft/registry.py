"""PEFT methods by name: each is a list of parts, each part injected by the function of its own module.

A new method is one ``register_method`` call; a new kind of part is one ``PARTS`` entry (an injector taking the
model and the whole ``PeftConfig``, which fills slots or wraps linears and never changes base state-dict keys).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from samadapt.peft.adapter import inject_adapters
from samadapt.peft.lora import inject_lora

PARTS: dict[str, Callable[[nn.Module, object], None]] = {
    "adapters": lambda model, config: inject_adapters(model, config.adapter),  # MSA
    "lora": lambda model, config: inject_lora(model, config.lora),  # SAMed, Cheap Lunch
}

METHODS: dict[str, tuple[str, ...]] = {}


def register_method(name: str, parts: tuple[str, ...]) -> None:
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"method {name!r}: unknown parts {unknown}; known: {', '.join(PARTS)}")
    METHODS[name] = tuple(parts)


register_method("msa", ("adapters",))
register_method("lora", ("lora",))
register_method("msa+lora", ("adapters", "lora"))
