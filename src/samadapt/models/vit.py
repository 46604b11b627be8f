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

from samadapt.models import common
from samadapt.models.common import IdentitySlot, LayerNorm2d, MLPBlock, ZeroSlot, pad_to_windows


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
        self.grid = grid = img_size // patch_size
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
        self.attn = Attention(dim, num_heads, input_size=attn_size, window_size=window_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.depth_branch: nn.Module = ZeroSlot()
        self.attn_adapter: nn.Module = IdentitySlot()
        self.mlp_adapter: nn.Module = ZeroSlot()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        a = self.attn(h) + self.depth_branch(h)
        x = x + self.attn_adapter(a)
        h = self.norm2(x)
        return x + self.mlp(h) + self.mlp_adapter(h)


class Attention(nn.Module):
    """Multi-head attention on a (B, H, W, D) grid with SAM's decomposed relative positions, windowed or global.

    ``qkv`` is one Linear whose output rows are [q (D) | k (D) | v (D)], each split into heads of D / num_heads.
    ``rel_pos_h`` / ``rel_pos_w`` have 2 * size - 1 rows for the grid ``input_size`` this attention runs on (the
    window, or the whole token grid for global attention).

    Windowed attention pads the grid to whole windows like SAM, whose padded tokens are zeros and so carry
    q, k, v = qkv.bias; we run ``qkv`` and ``proj`` on the real tokens only and fill the padding with that bias,
    which gives the same numbers for less work.

    The products go through the hook ``linear`` (``common.linear``), the attention itself through ``attend``
    (``attention_with_rel_pos``); ``samadapt.accel`` swaps in subclasses with other forms of the same function.
    """

    linear = staticmethod(common.linear)

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int], window_size: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
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
        qkv = self.linear(x, self.qkv)
        if self.window_size > 0:
            qkv = pad_to_windows(qkv, self.window_size, self.qkv.bias)
            qkv, padded = window_partition(qkv, self.window_size)
        grid = qkv.shape[1:3]
        qkv = qkv.reshape(qkv.shape[0], grid[0] * grid[1], 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self.attend(*qkv.unbind(0), grid)
        out = out.transpose(1, 2).reshape(out.shape[0], grid[0], grid[1], -1)
        if self.window_size > 0:
            out = window_unpartition(out, self.window_size, padded, (H, W))
        return self.linear(out, self.proj)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, heads, N, d) q, k, v of the tokens of ``grid`` -> (B, heads, N, d) (``attention_with_rel_pos``)."""
        return attention_with_rel_pos(q, k, v, self.rel_pos_h, self.rel_pos_w, grid)


# grids up to this many tokens (SAM's 14 x 14 windows) train faster with explicit attention than with fused kernels
EXPLICIT_ATTENTION_MAX_TOKENS = 400
# bias built per chunk of query rows for inference: one reused buffer of at most this size instead of the whole
# (B, heads, N, N) bias, 805 MB per ViT-B global block at 1024 (4096 tokens, 12 heads), fresh on every call. Its page
# faults made that block 396-401 ms with huge pages and 680-702 without; in chunks of 4-16 grid rows 338-372 ms
# either way, the same numbers (one call, 2 threads, AMD EPYC). SAM's 14 x 14 windows fit in one chunk.
BIAS_CHUNK_BYTES = 64 * 2**20


def attention_with_rel_pos(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + rel-pos bias) v for (B, heads, N, d) tensors on an (H, W) grid of N tokens.

    Three exact formulations, chosen by what is cheapest (measured on CPU, docs/benchmarks.md):
    - no gradient needed: the bias as an additive mask of scaled_dot_product_attention, built for a few rows of
      queries at a time (``BIAS_CHUNK_BYTES``);
    - gradient needed, small grids (windows): explicit softmax(q k^T + bias) v, whose (N, N) tensors are small;
    - gradient needed, large grids (global blocks): the bias folded into the dot product. bias[i, j] =
      <rel_h[i], onehot(row j)> + <rel_w[i], onehot(col j)>, so q' = [q / sqrt(d), rel_h, rel_w] and
      k' = [k, onehot rows, onehot cols] give q' k'^T = q k^T / sqrt(d) + bias. No (N, N) tensor is stored for the
      backward pass (fused kernels apply), which is where SAM's explicit attention spends its memory.
    """
    if not (torch.is_grad_enabled() and (q.requires_grad or rel_pos_h.requires_grad)):
        return _attention_with_bias_in_chunks(q, k, v, rel_pos_h, rel_pos_w, size)
    if q.shape[2] <= EXPLICIT_ATTENTION_MAX_TOKENS:
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + relative_position_bias(q, rel_pos_h, rel_pos_w, size)
        return scores.softmax(dim=-1) @ v
    H, W = size
    B, heads, N, d = q.shape
    bias_h, bias_w = _rel_pos_terms(q, rel_pos_h, rel_pos_w, size)
    q_aug = torch.cat([q * d**-0.5, bias_h.reshape(B, heads, N, H), bias_w.reshape(B, heads, N, W)], dim=-1)
    rows = torch.eye(H, dtype=q.dtype, device=q.device).repeat_interleave(W, dim=0)  # token j -> onehot(row j)
    cols = torch.eye(W, dtype=q.dtype, device=q.device).repeat(H, 1)
    k_aug = torch.cat([k, rows.expand(B, heads, N, H), cols.expand(B, heads, N, W)], dim=-1)
    # fused CPU / GPU kernels want one head width for q, k and v: pad to a multiple of 8
    width = -(-q_aug.shape[-1] // 8) * 8
    q_aug, k_aug = F.pad(q_aug, (0, width - q_aug.shape[-1])), F.pad(k_aug, (0, width - k_aug.shape[-1]))
    out = F.scaled_dot_product_attention(q_aug, k_aug, F.pad(v, (0, width - d)), scale=1.0)
    return out[..., :d]


def _attention_with_bias_in_chunks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size
) -> torch.Tensor:
    """The inference form of ``attention_with_rel_pos``: for each chunk of query rows of the grid, their rows of
    ``relative_position_bias`` written into one reused buffer and used as the additive mask of
    scaled_dot_product_attention. Each query's row is computed as with the whole bias."""
    H, W = size
    B, heads, N, _ = q.shape
    bias_h, bias_w = _rel_pos_terms(q, rel_pos_h, rel_pos_w, size)
    dtype = torch.promote_types(bias_h.dtype, bias_w.dtype)
    rows = max(1, min(H, BIAS_CHUNK_BYTES // (B * heads * W * N * dtype.itemsize)))
    chunk = q.new_empty(B, heads, rows, W, H, W, dtype=dtype)
    out = q.new_empty(B, heads, N, v.shape[-1])
    for top in range(0, H, rows):
        n = min(rows, H - top)
        bias = torch.add(
            bias_h[:, :, top : top + n, :, :, None], bias_w[:, :, top : top + n, :, None, :], out=chunk[:, :, :n]
        )
        queries = slice(top * W, (top + n) * W)
        mask = bias.view(B, heads, n * W, N).to(q.dtype)
        out[:, :, queries] = F.scaled_dot_product_attention(q[:, :, queries], k, v, attn_mask=mask)
    return out


def _rel_pos_terms(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size) -> tuple:
    """<q_i, R_h[row(i) - r]> for every key row r, and the same for columns: (B, heads, H, W, H) and (..., W)."""
    H, W = size
    B, heads, _, dim = q.shape
    q_grid = q.reshape(B, heads, H, W, dim)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, _gather_rel_pos(rel_pos_h, H).to(q.dtype))
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, _gather_rel_pos(rel_pos_w, W).to(q.dtype))
    return bias_h, bias_w


def relative_position_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """SAM's decomposed relative-position term as a (B, heads, H*W, H*W) additive attention bias.

    bias[i, j] = <q_i, R_h[row(i) - row(j)]> + <q_i, R_w[col(i) - col(j)]> for queries and keys on the same grid.
    """
    H, W = size
    bias_h, bias_w = _rel_pos_terms(q, rel_pos_h, rel_pos_w, size)
    bias = bias_h[..., :, None] + bias_w[..., None, :]  # (B, heads, H, W, H, W)
    return bias.reshape(q.shape[0], q.shape[1], H * W, H * W)


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
