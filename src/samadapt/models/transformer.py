"""SAM's two-way transformer: prompt tokens and image tokens attend to each other, with adapter slots."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samadapt.models.common import IdentitySlot, MLPBlock, ZeroSlot


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks, then a final token-to-image attention.

    Image tokens (B, C, h, w) are flattened to (B, h*w, C); prompt tokens are (B, T, C). Returns the updated
    tokens (B, T, C) and image tokens (B, h*w, C).
    """

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, activation, attention_downsample_rate, i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn_out = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn_out), keys


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of tokens, token-to-image attention, token MLP, image-to-token attention.

    Slots (docs/architecture.md): ``token_to_image_adapter(x, prompt)`` after the token-to-image attention (MSA's
    prompt-conditioned adapter receives the prompt embedding), ``mlp_adapter`` beside the MLP, and
    ``image_to_token_adapter`` on the image tokens after their residual, before ``norm4``.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe
        self.token_to_image_adapter: nn.Module = IdentitySlot()
        self.mlp_adapter: nn.Module = ZeroSlot()
        self.image_to_token_adapter: nn.Module = IdentitySlot()

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:  # the first block's tokens already are the prompt embedding
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        attn_out = self.cross_attn_token_to_image(queries + query_pe, keys + key_pe, keys)
        attn_out = self.token_to_image_adapter(attn_out, query_pe)
        queries = self.norm2(queries + attn_out)
        queries = self.norm3(queries + self.mlp(queries) + self.mlp_adapter(queries))
        attn_out = self.cross_attn_image_to_token(keys + key_pe, queries + query_pe, queries)
        keys = self.norm4(self.image_to_token_adapter(keys + attn_out))
        return queries, keys


class Attention(nn.Module):
    """Multi-head attention whose internal width may be reduced by ``downsample_rate`` (SAM's cross attention).

    q, k, v: (B, N, C) -> (B, N_q, C). ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` keep SAM's names.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the internal width {self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, N, C / heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        )
        return self.out_proj(out.transpose(1, 2).flatten(2))
