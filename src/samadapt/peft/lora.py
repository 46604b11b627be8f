"""LoRA on linear layers, optionally on chosen output rows only (q and v inside a fused qkv projection).

``LoRALinear`` subclasses ``nn.Linear`` and keeps the wrapped layer's own ``weight`` and ``bias`` parameters, so the
state-dict keys of the base model do not change; the low-rank factors are extra parameters ``lora_A_<part>`` and
``lora_B_<part>``. B starts at zero (the adapted layer starts as the base layer), A is Kaiming-uniform as in LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from samadapt.errors import ConfigError


@dataclass
class LoRAConfig:
    """LoRA factors.

    Attributes:
        rank: r of the low-rank update (SAMed, Cheap Lunch: 4).
        alpha: the update is scaled by alpha / rank; None means alpha = rank (scale 1, as SAMed).
        dropout: dropout on the LoRA input path.
        encoder_parts: parts of each encoder block's fused qkv projection to adapt (SAMed: q and v).
        decoder: also adapt the mask decoder's attention q and v projections (Cheap Lunch).
    """

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    encoder_parts: tuple[str, ...] = ("q", "v")
    decoder: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {self.rank}")
        self.encoder_parts = tuple(self.encoder_parts)
        unknown = set(self.encoder_parts) - {"q", "k", "v"}
        if unknown:
            raise ConfigError(f"unknown LoRA parts {sorted(unknown)}: choose among q, k, v")


def rows_index(rows: slice | list[slice], out_features: int) -> torch.Tensor:
    """Output-row indices of a slice or a list of slices."""
    parts = rows if isinstance(rows, list) else [rows]
    return torch.cat([torch.arange(out_features)[part] for part in parts])


class LoRALinear(nn.Linear):
    """y = W x + b + (alpha / r) * B (A dropout(x)), with one (A, B) pair per targeted group of output rows."""

    def __init__(
        self,
        base: nn.Linear,
        parts: dict[str, slice | list[slice]] | None = None,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameter objects: keys and storage are shared
        parts = parts or {"all": slice(0, base.out_features)}
        self.rank = rank
        self.scaling = (alpha if alpha is not None else rank) / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.part_names = list(parts)
        self.merged = False
        self.enabled = True  # off: the base layer alone (see disable_adapters)
        self.blend = 1.0  # weight of the update (peft.blend, WiSE-FT); change it un-merged (peft.blend.set_blend)
        device, dtype = base.weight.device, base.weight.dtype
        for name, rows in parts.items():
            index = rows_index(rows, base.out_features).to(device)
            self.register_buffer(f"rows_{name}", index, persistent=False)
            a = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.register_parameter(f"lora_A_{name}", a)
            self.register_parameter(
                f"lora_B_{name}", nn.Parameter(torch.zeros(len(index), rank, device=device, dtype=dtype))
            )

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) update the LoRA factors add to ``weight``."""
        a, b = self._stacked_factors()
        return (b @ a) * (self.scaling * self.blend)

    def _stacked_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All parts' A stacked (P*r, in) and their B placed on the output rows (out, P*r)."""
        a = torch.cat([getattr(self, f"lora_A_{name}") for name in self.part_names])
        b = self.weight.new_zeros(self.out_features, a.shape[0], dtype=a.dtype)
        for k, name in enumerate(self.part_names):
            rows = getattr(self, f"rows_{name}")
            b = b.index_copy(
                0,
                rows,
                torch.nn.functional.pad(
                    getattr(self, f"lora_B_{name}"), (k * self.rank, (len(self.part_names) - k - 1) * self.rank)
                ),
            )
        return a, b

    accepts_base_product = True  # accel.kernels.linear hands in the kernel the plain layer would take at its call site

    def forward(self, x: torch.Tensor, base_product: Callable | None = None) -> torch.Tensor:
        # the base layer's own kernel at this call site (F.linear, or oneDNN's for TinyViT's CPU inference), so LoRA
        # switched off computes the base model's numbers exactly
        out = (base_product or F.linear)(x, self.weight, self.bias)
        if self.merged or not self.enabled:  # disable_adapters un-merges first
            return out
        # one low-rank product for all parts: a thin matmul, then the second one accumulated into the base output by
        # addmm (the scaling folded into the small B): no separate passes over the output to scale and add
        a, b = self._stacked_factors()
        low = F.linear(self.lora_dropout(x), a)
        b = (b * (self.scaling * self.blend)).to(low.dtype)
        if out.dtype != low.dtype:  # a base layer in another dtype than the factors: keep the base's dtype
            return out + F.linear(low, b).to(out.dtype)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]), b.t())
        return flat.view(out.shape)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight`` (deployment: no extra cost at inference)."""
        if not self.merged:
            self.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling}, parts={self.part_names}"


def add_lora(
    parent: nn.Module,
    attribute: str,
    parts: dict[str, slice | list[slice]] | None = None,
    rank: int = 4,
    alpha: float | None = None,
    dropout: float = 0.0,
) -> LoRALinear:
    """Replace ``parent.<attribute>`` (an ``nn.Linear``) by a ``LoRALinear`` sharing its weights."""
    base = getattr(parent, attribute)
    if isinstance(base, LoRALinear):
        raise ValueError(f"{attribute} already carries LoRA")
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{attribute} is a {type(base).__name__}, LoRA needs an nn.Linear")
    wrapped = LoRALinear(base, parts, rank, alpha, dropout)
    setattr(parent, attribute, wrapped)
    return wrapped


def inject_lora(model: nn.Module, config: LoRAConfig) -> None:
    """LoRA on the chosen parts of every encoder block's qkv projection, and (``config.decoder``) on the q and v
    projections of every mask-decoder attention (Cheap Lunch)."""
    from samadapt.peft.blocks import encoder_blocks

    for block in encoder_blocks(model):
        slices = block.attn.qkv_slices()
        parts = {name: slices[name] for name in config.encoder_parts}
        add_lora(block.attn, "qkv", parts, config.rank, config.alpha, config.dropout)
    if config.decoder:
        attentions = [m for m in model.mask_decoder.modules() if hasattr(m, "q_proj") and hasattr(m, "v_proj")]
        for attention in attentions:
            add_lora(attention, "q_proj", None, config.rank, config.alpha, config.dropout)
            add_lora(attention, "v_proj", None, config.rank, config.alpha, config.dropout)
