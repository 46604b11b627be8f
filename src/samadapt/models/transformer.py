"""SAM's two-way transformer: prompt tokens and image tokens attend to each other; adapter slots in every block.

State-dict keys and shapes are those of ``segment_anything.modeling.TwoWayTransformer``; the empty slots add none.
Attention runs through ``torch.nn.functional.scaled_dot_product_attention``, the projections through the product
hook ``Attention.linear`` (``common.linear``; ``samadapt.accel`` puts oneDNN's kernels there for CPU inference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samadapt.models import common
from samadapt.models.common import IdentitySlot, MLPBlock, ZeroSlot


class Attention(nn.Module):
    """Multi-head attention whose internal width may be reduced by ``downsample_rate`` (SAM's cross attention).

    q (B, N_q, C), k (B, N_k, C), v (B, N_k, C) -> (B, N_q, C). The projections keep SAM's names ``q_proj``,
    ``k_proj``, ``v_proj`` (C -> C / downsample_rate) and ``out_proj`` (back to C), so LoRA can wrap them.
    """

    linear = staticmethod(common.linear)  # the product hook (``common.linear``)

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError(f"{num_heads} heads do not divide the internal width {self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, heads, N, D / heads)."""
        b, n, d = x.shape
        return x.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.linear(x, proj) for x, proj in ((q, self.q_proj), (k, self.k_proj), (v, self.v_proj)))
        heads = F.scaled_dot_product_attention(
            self._split_heads(q), self._split_heads(k), self._split_heads(v)
        )  # softmax(q k^T / sqrt(D / heads)) v
        b, _, n, _ = heads.shape
        return self.linear(heads.transpose(1, 2).reshape(b, n, self.internal_dim), self.out_proj)


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token-to-image attention, token MLP, image-to-token attention.

    Tokens (queries) are (B, T, C), image tokens (keys) are (B, h*w, C); ``query_pe`` is the original prompt-token
    embedding (B, T, C), ``key_pe`` the image positional encoding (B, h*w, C).

    Adapter slots (docs/architecture.md), empty by default (no parameters, no state-dict keys)::

        attn_out = token_to_image_adapter(cross_attn_token_to_image(q + query_pe, k + key_pe, k), query_pe)
        queries = norm2(queries + attn_out)
        queries = norm3(queries + mlp(queries) + mlp_adapter(queries))
        keys = norm4(image_to_token_adapter(keys + cross_attn_image_to_token(k + key_pe, q + query_pe, q)))

    ``token_to_image_adapter(x, prompt)`` is an identity slot that also receives the prompt embedding (MSA's
    prompt-conditioned adapter), ``mlp_adapter`` a zero slot beside the MLP, ``image_to_token_adapter`` an identity
    slot on the image tokens before ``norm4``.
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
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe
        self.token_to_image_adapter: nn.Module = IdentitySlot()
        self.mlp_adapter: nn.Module = ZeroSlot()
        self.image_to_token_adapter: nn.Module = IdentitySlot()

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the updated tokens (B, T, C) and image tokens (B, h*w, C)."""
        # 1. token self-attention (the first block's tokens are the prompt embedding itself: no residual, no pe)
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        # 2. tokens attend to the image (the image keys with their position serve steps 2 and 4: computed once)
        keys_with_pe = keys + key_pe
        attn_out = self.cross_attn_token_to_image(queries + query_pe, keys_with_pe, keys)
        attn_out = self.token_to_image_adapter(attn_out, query_pe)
        queries = self.norm2(queries + attn_out)

        # 3. token MLP, with a parallel adapter
        mlp_out = self.mlp(queries)
        queries = self.norm3(queries + mlp_out + self.mlp_adapter(queries))

        # 4. the image attends to the tokens
        attn_out = self.cross_attn_image_to_token(keys_with_pe, queries + query_pe, queries)
        keys = self.norm4(self.image_to_token_adapter(keys + attn_out))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks, then a final token-to-image attention.

    Args:
        depth: number of two-way blocks (2 in SAM).
        embedding_dim: token width C (256).
        num_heads: attention heads (8).
        mlp_dim: hidden width of the token MLP (2048).
        activation: activation class of the token MLP (ReLU in SAM).
        attention_downsample_rate: internal width reduction of the cross attentions (2).
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
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=i == 0,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: image_embedding (B, C, h, w), image_pe (B, C, h, w), point_embedding (B, T, C) (output tokens
        followed by the sparse prompt tokens). Returns tokens (B, T, C) and image tokens (B, h*w, C)."""
        # token-major once (a no-op for a channels-last embedding): every add below keeps its inputs' layout, and
        # the products would copy a channel-major (B, h*w, C) view on each of their ~30 calls
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn_out = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        queries = self.norm_final_attn(queries + attn_out)
        return queries, keys
