"""TinyViT's window attention with learned per-offset biases, and its MLP (the attention stages' parts).

Plain torch modules; their hooks (``linear``, ``partition``, ``merge``, ``attend``, ``window_attention``) are where
``samadapt.accel`` swaps in other forms of the same function (``models/tiny_vit.py`` says which).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from samadapt.models import common
from samadapt.models.common import ATTENTION_PATHS, biased_attention, pad_to_windows


class Mlp(nn.Module):
    """``fc2(GELU(fc1(norm(x))))`` on (..., C); ``forward_normed`` starts after ``norm`` (the block computes it once)."""

    linear = staticmethod(common.linear)  # the product hook (``common.linear``)

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward_normed(self, m: torch.Tensor) -> torch.Tensor:
        return self.linear(self.linear(m, self.fc1, gelu=True), self.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_normed(self.norm(x))


class Attention(nn.Module):
    """Window attention with TinyViT's learned per-offset biases, on a (B, H, W, C) grid -> (B, H, W, C).

    ``norm`` (LayerNorm) is applied first, as in the reference. The grid is cut into ``window_size`` squares (padded
    at the bottom / right when it does not tile) and each window attends to itself:
    softmax(q k^T / sqrt(key_dim) + bias) v, through ``scaled_dot_product_attention`` with the bias as additive mask.

    ``qkv`` (Linear C -> heads * (2 * key_dim + d)) is laid out PER HEAD, unlike SAM's ViT (q, k, v contiguous
    blocks): its output is viewed as (..., heads, 2 * key_dim + d) and split into [q (key_dim) | k (key_dim) | v (d)],
    so head h owns rows [h * P, (h + 1) * P) with P = 2 * key_dim + d, of which q is the first key_dim, k the next
    key_dim, v the last d. ``qkv_slices()`` lists those row ranges (LoRA targets q and v with them; the depth branch
    reuses ``norm``, ``qkv`` and ``proj`` with them). ``d`` = attn_ratio * key_dim is the value width per head;
    ``proj`` maps heads * d back to C.

    ``attention_biases`` (heads, number of distinct |offsets|) is trainable; ``attention_bias_idxs`` (N, N) maps each
    (query, key) pair of a window of N = window_size ** 2 tokens to its offset (a non-persistent buffer, as in the
    reference, so it is not in the state dict).
    """

    linear = staticmethod(common.linear)  # the product hook (``common.linear``)
    attention_paths = ATTENTION_PATHS  # what ``attend`` takes

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.attn_ratio = attn_ratio
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.scale = key_dim**-0.5
        self.window_size = window_size
        self.attention_path = "auto"  # one of ``attention_paths`` (``attend``); TinyViT.set_attention_path
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + self.d))
        self.proj = nn.Linear(self.dh, dim)
        points = list(itertools.product(range(window_size), range(window_size)))
        offsets: dict[tuple[int, int], int] = {}
        index = [offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets)) for a in points for b in points]
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer(
            "attention_bias_idxs",
            torch.tensor(index, dtype=torch.long).view(len(points), len(points)),
            persistent=False,
        )

    def qkv_slices(self) -> dict[str, list[slice]]:
        """Output rows of ``qkv`` that hold q, k and v: for each, one slice per head, in head order."""
        per_head = 2 * self.key_dim + self.d
        starts = [h * per_head for h in range(self.num_heads)]
        return {
            "q": [slice(s, s + self.key_dim) for s in starts],
            "k": [slice(s + self.key_dim, s + 2 * self.key_dim) for s in starts],
            "v": [slice(s + 2 * self.key_dim, s + per_head) for s in starts],
        }

    def attention_bias(self) -> torch.Tensor:
        """The additive bias (heads, N, N) of one window, gathered from the trainable table."""
        # gathered every call (no cache to go stale when the table is trained or loaded): index_select costs
        # microseconds, where advanced indexing ``biases[:, idxs]`` takes ~15 ms on CPU
        n = self.attention_bias_idxs.shape[0]
        return self.attention_biases.index_select(1, self.attention_bias_idxs.view(-1)).view(-1, n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        w = self.window_size
        qkv = self.linear(self.norm(x), self.qkv)  # (B, H, W, P * heads)
        fill = None
        if H % w or W % w:
            # the reference pads the tokens with zeros before the attention: a zero token normalises to norm.bias
            # and so carries qkv(norm(0)). Fill the padding with that row rather than run norm and qkv on it.
            fill = self.linear(self.norm(x.new_zeros(1, C)), self.qkv)[0]
        return self.window_attention(qkv, fill)

    def window_attention(self, qkv: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
        """The attention after ``qkv``: (B, H, W, P * heads) -> (B, H, W, C); ``fill``: the (P * heads,) row of
        the window padding (None: the windows tile the grid)."""
        B, H, W, _ = qkv.shape
        w = self.window_size
        windows = self.partition(qkv, fill)
        G, nh, nw = windows.shape[0] * windows.shape[1] * windows.shape[2], windows.shape[1], windows.shape[2]
        q, k, v = windows.view(G, w * w, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        bias = self.attention_bias().to(q.dtype)[None]  # 4-D (1, heads, N, N): the fused CPU kernel needs 4-D
        out = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias)  # (B * nh * nw, heads, N, d)
        grid = out.view(B, nh, nw, self.num_heads, w, w, self.d).permute(0, 1, 4, 2, 5, 3, 6)  # (B, nh, w, nw, w, ..)
        return self.linear(self.merge(grid, H, W), self.proj)

    def partition(self, qkv: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
        """(B, H, W, P) -> (B, nh, nw, w, w, P) windows, padded with ``fill`` (``pad_and_partition``)."""
        return pad_and_partition(qkv, self.window_size, fill)

    def merge(self, grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, nh, w, nw, w, heads, d) window outputs seen in grid order -> (B, height, width, heads * d), padding
        dropped (``proj`` is per token: cropped before it)."""
        B, nh, w, nw = grid.shape[:4]
        return grid.reshape(B, nh * w, nw * w, self.dh)[:, :height, :width]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T * scale + bias) v by ``attention_path`` (``common.biased_attention``)."""
        return biased_attention(q, k, v, bias, self.scale, self.attention_path)


def pad_and_partition(qkv: torch.Tensor, w: int, fill: torch.Tensor | None) -> torch.Tensor:
    """(B, H, W, P) -> (B, nh, nw, w, w, P) windows, padded at the bottom / right with the (P,) ``fill`` row, by
    padding and reshaping: by concatenation under autograd (``common.pad_to_windows``: views of the gradient in its
    backward), by slice assignments into one buffer without it."""
    B, H, W, P = qkv.shape
    pad_b, pad_r = -H % w, -W % w
    if fill is not None and qkv.requires_grad:
        qkv = pad_to_windows(qkv, w, fill)
    elif fill is not None:
        padded = qkv.new_empty(B, H + pad_b, W + pad_r, P)
        padded[:, :H, :W] = qkv
        padded[:, H:] = fill
        padded[:, :H, W:] = fill
        qkv = padded
    nh, nw = (H + pad_b) // w, (W + pad_r) // w
    return qkv.view(B, nh, w, nw, w, P).transpose(2, 3).contiguous()
