"""PEFT methods by name: each is a list of parts, each part injected by the function of its own module.

A new method is one ``register_method`` call; a new kind of part is one ``PARTS`` entry (an injector taking the
model and the whole ``PeftConfig``, which fills slots or wraps linears and never changes base state-dict keys).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from samadapt.errors import ConfigError
from samadapt.peft.adapter import inject_adapters
from samadapt.peft.lora import inject_lora

PARTS: dict[str, Callable[[nn.Module, object], None]] = {
    "adapters": lambda model, config: inject_adapters(model, config.adapter),  # MSA
    "lora": lambda model, config: inject_lora(model, config.lora),  # SAMed, Cheap Lunch
}

METHODS: dict[str, tuple[str, ...]] = {}


def register_method(name: str, parts: tuple[str, ...]) -> None:
    """Make method ``name`` (its ``parts``, injected in order) available to ``PeftConfig.method``.

    Raises:
        ConfigError: ``name`` is taken (a second method of the same name would silently change what saved runs of
            the first load into), or a part is unknown.
    """
    if name in METHODS:
        raise ConfigError(
            f"PEFT method {name!r} is already registered (parts {', '.join(METHODS[name])}); choose another name"
        )
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ConfigError(f"method {name!r}: unknown parts {unknown}; known: {', '.join(PARTS)}")
    METHODS[name] = tuple(parts)


register_method("msa", ("adapters",))
register_method("lora", ("lora",))
register_method("msa+lora", ("adapters", "lora"))
