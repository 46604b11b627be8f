"""MSA bottleneck adapters: Linear(D -> D*r) -> activation -> Linear(D*r -> D).

The up-projection starts at zero, so an adapted model starts as exactly the base model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from samadapt.errors import ConfigError


@dataclass
class AdapterConfig:
    """MSA adapters.

    Attributes:
        ratio: bottleneck width as a fraction of the token width (MSA: 0.25).
        mlp_scale: factor on the adapter beside the MLP (MSA: 0.5).
        encoder: adapters in every image-encoder block (space + MLP).
        decoder: the three adapters in the FIRST two-way decoder block (the first one prompt-conditioned).
    """

    ratio: float = 0.25
    mlp_scale: float = 0.5
    encoder: bool = True
    decoder: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 4:
            raise ConfigError(f"adapter ratio must be in (0, 4], got {self.ratio}")


class Adapter(nn.Module):
    """Bottleneck adapter on (..., D) tokens.

    Args:
        dim: token width D.
        ratio: hidden width as a fraction of D (MSA: 0.25).
        skip: return ``x + scale * f(x)`` (a serial adapter) instead of ``scale * f(x)`` (a parallel branch).
        scale: factor on the adapter's output (MSA's MLP adapter: 0.5).
    """

    def __init__(self, dim: int, ratio: float = 0.25, skip: bool = True, scale: float = 1.0) -> None:
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        self.skip = skip
        self.scale = scale
        self.enabled = True  # off: the slot's empty behaviour (identity, or nothing added); see disable_adapters
        self.blend = 1.0  # weight of the trained update (peft.blend, WiSE-FT); 1: as trained
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def bottleneck(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self.scale * self.blend) * self.up(self.act(hidden))

    def forward(self, x: torch.Tensor, *context: torch.Tensor) -> torch.Tensor | float:
        if not self.enabled:
            return x if self.skip else 0.0
        out = self.bottleneck(self.down(x))
        return x + out if self.skip else out


class PromptConditionedAdapter(Adapter):
    """MSA's first decoder adapter: the prompt embedding, down-projected on its own, joins the hidden state.

    ``forward(x, prompt)`` with x and prompt both (B, T, D): hidden = down(x) + prompt_down(prompt).
    """

    def __init__(self, dim: int, ratio: float = 0.25, skip: bool = True, scale: float = 1.0) -> None:
        super().__init__(dim, ratio, skip, scale)
        self.prompt_down = nn.Linear(dim, self.down.out_features)

    def forward(self, x: torch.Tensor, *context: torch.Tensor) -> torch.Tensor | float:
        if not self.enabled:
            return x if self.skip else 0.0
        if not context:
            raise ValueError("PromptConditionedAdapter needs the prompt embedding as its second input")
        out = self.bottleneck(self.down(x) + self.prompt_down(context[0]))
        return x + out if self.skip else out


def inject_adapters(model: nn.Module, config: AdapterConfig) -> None:
    """Fill the MSA slots: space + MLP adapters in every encoder block (``config.encoder``), and the three adapters
    of the FIRST two-way decoder block, the first one prompt-conditioned (``config.decoder``)."""
    from samadapt.peft.blocks import decoder_blocks, encoder_blocks

    if config.encoder:
        for block in encoder_blocks(model):
            dim = block.attn.proj.out_features
            block.attn_adapter = Adapter(dim, config.ratio, skip=True)
            block.mlp_adapter = Adapter(dim, config.ratio, skip=False, scale=config.mlp_scale)
    if config.decoder:
        first = decoder_blocks(model)[0]
        dim = first.norm1.normalized_shape[0]
        first.token_to_image_adapter = PromptConditionedAdapter(dim, config.ratio, skip=True)
        first.mlp_adapter = Adapter(dim, config.ratio, skip=False, scale=config.mlp_scale)
        first.image_to_token_adapter = Adapter(dim, config.ratio, skip=True)
