"""MSA's depth branch: the block's own attention, run across the slices of a volume at each token position.

For a stack of D slices the encoder sees a batch of D images. The space branch (the block's normal attention) mixes
tokens within a slice; the depth branch transposes (D, N, C) -> (N, D, C) and attends over the D slices at every
token position, with the SAME q/k/v/proj weights, on un-windowed tokens (the authors' code mixed windows with depth).
Its result passes through a zero-initialised adapter and is added to the space branch, so training starts from the
2D model; a stack of one slice has nothing to mix and takes the 2D path exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samadapt.peft.adapter import Adapter
from samadapt.peft.lora import rows_index


class DepthBranch(nn.Module):
    """Fills a block's ``depth_branch`` slot.

    Args:
        attention: the block's attention module; needs ``qkv``, ``proj``, ``num_heads`` and ``qkv_slices()``, and
            applies ``attention.norm`` first when it has one (TinyViT normalises inside its attention).
        ratio: hidden ratio of the output adapter.
    """

    def __init__(self, attention: nn.Module, ratio: float = 0.25) -> None:
        super().__init__()
        self.attention = [attention]  # a list: borrowed weights, not registered twice in the state dict
        dim = attention.qkv.in_features
        self.adapter = Adapter(attention.proj.out_features, ratio, skip=False)
        self.depth: int | None = None  # slices per volume; None: the whole batch is one volume
        self.in_dim = dim
        self.enabled = True  # off: adds nothing (see disable_adapters)

    def forward(self, h: torch.Tensor, *context: torch.Tensor) -> torch.Tensor | float:
        batch = h.shape[0]
        depth = self.depth or batch
        if depth == 1 or not self.enabled:
            return 0.0
        if batch % depth:
            raise ValueError(f"batch of {batch} slices is not a whole number of {depth}-slice volumes")
        attention = self.attention[0]
        tokens = h.reshape(batch // depth, depth, -1, h.shape[-1]).transpose(1, 2)  # (V, N, D, C)
        tokens = getattr(attention, "norm", nn.Identity())(tokens)
        qkv = attention.qkv(tokens)
        heads = attention.num_heads
        q, k, v = (
            qkv.index_select(-1, rows_index(rows, qkv.shape[-1]).to(qkv.device))
            .unflatten(-1, (heads, -1))
            .transpose(-3, -2)
            for rows in (attention.qkv_slices()[part] for part in ("q", "k", "v"))
        )  # each (V, N, heads, D, head_dim)
        mixed = F.scaled_dot_product_attention(q, k, v).transpose(-3, -2).flatten(-2)  # (V, N, D, heads*dv)
        out = attention.proj(mixed).transpose(1, 2).reshape(*h.shape[:-1], -1)
        return self.adapter(out)


def set_depth(model: nn.Module, depth: int | None) -> None:
    """Tell every depth branch how many consecutive batch entries form one volume (None: the whole batch)."""
    for module in model.modules():
        if isinstance(module, DepthBranch):
            module.depth = depth


def inject_depth(model: nn.Module, ratio: float) -> None:
    """MSA's depth branch in every encoder block (attention across the slices of a stack)."""
    from samadapt.peft.blocks import encoder_blocks

    for block in encoder_blocks(model):
        block.depth_branch = DepthBranch(block.attn, ratio)
