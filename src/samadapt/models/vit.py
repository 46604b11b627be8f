"""SAM's ViT image encoder (ViT-B / L / H), with fused attention and empty adapter slots.

Same parameter names and shapes as the official checkpoints. Attention runs through
``scaled_dot_product_attention`` with SAM's decomposed relative-position term passed as an additive bias, which is
the same function as the original explicit softmax(QK^T + bias)V and several times faster on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from samadapt.models.common import IdentitySlot, LayerNorm2d, MLPBlock, ZeroSlot


class ImageEncoderViT(nn.Module):
    """Patch embedding, ``depth`` transformer blocks (windowed, with a few global ones) and a conv neck.

    Input (B, 3, img_size, img_size); output (B, out_chans, img_size / patch_size, img_size / patch_size).
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in the backward pass: less memory, about one more forward of time."""
        self.grad_checkpointing = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided conv: (B, C, H, W) -> (B, H/p, W/p, D)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block on (B, H, W, D) tokens, windowed when ``window_size`` > 0.

    Slots (see docs/architecture.md): ``depth_branch`` adds to the attention output (MSA 3D), ``attn_adapter``
    transforms it before the residual (MSA space adapter), ``mlp_adapter`` runs beside the MLP (MSA MLP adapter).
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, input_size: tuple[int, int]
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = (window_size, window_size) if window_size > 0 else input_size
        self.attn = Attention(dim, num_heads, input_size=attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.depth_branch: nn.Module = ZeroSlot()
        self.attn_adapter: nn.Module = IdentitySlot()
        self.mlp_adapter: nn.Module = ZeroSlot()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.window_size > 0:
            height, width = h.shape[1:3]
            windows, padded = window_partition(h, self.window_size)
            a = window_unpartition(self.attn(windows), self.window_size, padded, (height, width))
        else:
            a = self.attn(h)
        a = a + self.depth_branch(h)
        x = x + self.attn_adapter(a)
        h = self.norm2(x)
        return x + self.mlp(h) + self.mlp_adapter(h)


class Attention(nn.Module):
    """Multi-head attention on a (B, H, W, D) grid with SAM's decomposed relative positions.

    ``qkv`` is one Linear whose output rows are [q (D) | k (D) | v (D)], each split into heads of D / num_heads.
    ``rel_pos_h`` / ``rel_pos_w`` have 2 * size - 1 rows for the grid ``input_size`` this attention runs on.
    """

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))

    def qkv_slices(self) -> dict[str, slice]:
        """Which output rows of ``qkv`` hold q, k and v (used by LoRA to target q and v only)."""
        dim = self.proj.in_features
        return {"q": slice(0, dim), "k": slice(dim, 2 * dim), "v": slice(2 * dim, 3 * dim)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, H*W, head_dim)
        bias = relative_position_bias(q, self.rel_pos_h, self.rel_pos_w, (H, W))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(B, H, W, -1))


def relative_position_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """SAM's decomposed relative-position term as a (B, heads, H*W, H*W) additive attention bias.

    bias[i, j] = <q_i, R_h[row(i) - row(j)]> + <q_i, R_w[col(i) - col(j)]> for queries and keys on the same grid.
    """
    H, W = size
    B, heads, _, dim = q.shape
    r_h = _gather_rel_pos(rel_pos_h, H).to(q.dtype)  # (H, H, dim)
    r_w = _gather_rel_pos(rel_pos_w, W).to(q.dtype)
    q_grid = q.reshape(B, heads, H, W, dim)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, r_h)
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, r_w)
    bias = bias_h[..., :, None] + bias_w[..., None, :]  # (B, heads, H, W, H, W)
    return bias.reshape(B, heads, H * W, H * W)


def _gather_rel_pos(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """Rows of a (2 * size - 1, C) table for every (query, key) offset: (size, size, C)."""
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(
            f"relative-position table has {rel_pos.shape[0]} rows, expected {2 * size - 1} for a grid of {size}; "
            "resize it when loading (samadapt.models.registry does this)"
        )
    coords = torch.arange(size, device=rel_pos.device)
    offsets = coords[:, None] - coords[None, :] + (size - 1)
    return rel_pos[offsets]


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * n_windows, window, window, C), zero-padding H and W up to multiples of ``window``."""
    B, H, W, C = x.shape
    pad_h, pad_w = (window - H % window) % window, (window - W % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window, window, Wp // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, C), (Hp, Wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of ``window_partition``: back to (B, H, W, C) without the padding."""
    Hp, Wp = padded
    H, W = size
    B = windows.shape[0] // (Hp * Wp // window // window)
    x = windows.view(B, Hp // window, Wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    return x[:, :H, :W, :].contiguous()


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize a (1, g, g, D) absolute position embedding to (1, grid, grid, D) (bicubic, as in ViT fine-tuning)."""
    if pos_embed.shape[1] == grid:
        return pos_embed
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1)


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resample a (L, C) relative-position table to (length, C), as SAM does for mismatched grids."""
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(rel_pos.T[None], size=length, mode="linear", align_corners=False)
    return resized[0].T
