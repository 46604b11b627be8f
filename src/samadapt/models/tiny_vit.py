"""TinyViT image encoder of LiteMedSAM and MobileSAM, with fused attention and the empty adapter slots.

Layout (LiteMedSAM: ``img_size`` 256, ``patch_stride`` 1; MobileSAM: 1024, 4). With r = img_size / patch_stride:

    patch_embed   (B, 3, S, S) -> (B, 64, r, r)          two Conv-BN (1x1 for LiteMedSAM, 3x3 stride 2 for MobileSAM)
    layers[0]     MBConv x 2 at r, then merge stride 2   convolutional: no attention, no slots
    layers[1]     2 attention blocks at r/2, 7x7 windows, merge stride 2
    layers[2]     6 attention blocks at r/4, 14x14 windows, merge stride 1 (TinyViT-SAM keeps r/4)
    layers[3]     2 attention blocks at r/4, 7x7 windows
    neck          (B, 320, r/4, r/4) -> (B, 256, r/4, r/4) 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d

so the embedding grid is img_size / 4 for LiteMedSAM (64 at 256) and img_size / 16 for MobileSAM (64 at 1024).
Any ``img_size`` divisible by 4 * patch_stride works (every multiple of 64 works for both); windows that do not
tile the grid are padded like the reference. Parameter names and shapes are those of TinyViT-SAM, so the
``image_encoder.*`` tensors of lite_medsam.pth (and of MobileSAM's mobile_sam.pt, with ``num_classes=1000`` for its
unused classification head) load with ``strict=True``.

Faster than the reference for the same numbers (float tolerance): attention through ``scaled_dot_product_attention``
with the learned biases as its additive mask (the explicit form in bf16 on the CPU, where the fused kernel is slow,
and oneDNN Graph's fused attention for CPU inference on the 14 x 14 windows: ``common.biased_attention``,
switch ``TinyViT.set_attention_path``), convolutions in channels-last layout, batch norm
folded into the convolution in eval mode, oneDNN's fused convolution / linear + GELU kernels for CPU inference
(``cpu_kernels``; stage 0's MBConv and patch merging in strips of rows that stay in cache), no ``norm`` / ``qkv``
/ ``proj`` work on window padding (bench/tiny_vit_forward.py), and, for CPU inference, windows cut (padding included)
and merged back (padding dropped) by one copy each way (``set_window_copies``).

An ONNX export (``torch.onnx.is_in_onnx_export()``) traces graph forms of the same function that run faster on
onnxruntime's CPU provider, in standard ONNX ops only: stage 0's MBConv and patch merging in strips of rows
(``_in_strips``) and the window attention with one transpose each way (``Attention._exported``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from samadapt.models import cpu_kernels
from samadapt.models.common import (
    ATTENTION_PATHS,
    IdentitySlot,
    LayerNorm2d,
    ZeroSlot,
    biased_attention,
    frozen_prefix,
    pad_to_windows,
)

_window_copies = True


def set_window_copies(enabled: bool = True) -> None:
    """Window attention cuts and merges its windows for CPU inference by one copy each way (default), or, off, by
    the padding and reshapes it uses under autograd (the same numbers, bit for bit; process-wide)."""
    global _window_copies
    _window_copies = enabled


def drop_path(x: torch.Tensor, prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch for a random subset of samples (axis 0), rescale the rest."""
    if prob == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - prob)
    return x * keep / (1.0 - prob)


def gelu_fresh(x: torch.Tensor) -> torch.Tensor:
    """GELU of a tensor that was just made and is referenced nowhere else: in place when autograd does not track it.

    Writing into the tensor saves a fresh allocation, which on CPU costs more than the GELU itself for large
    activations (new pages are faulted in and zeroed). Same numbers as ``F.gelu``.
    """
    return torch.ops.aten.gelu_(x) if not x.requires_grad else F.gelu(x)


def add_fresh(x: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """``x + fresh`` for a ``fresh`` tensor that was just made: in its own memory when autograd does not track it.

    Float addition is commutative, so ``fresh.add_(x)`` gives exactly the numbers of ``x + fresh``. Not in place when
    the dtypes differ (autocast: a bfloat16 branch added to a float32 stream must give float32) or shapes broadcast.
    """
    if fresh.requires_grad or fresh.dtype != x.dtype or fresh.shape != x.shape:
        return x + fresh
    return fresh.add_(x)


class Conv2dBN(nn.Sequential):
    """Convolution without bias, then batch norm (keys ``c`` and ``bn``). (B, C_in, H, W) -> (B, C_out, H', W').

    In eval mode the batch norm is an affine map, folded into the convolution: one pass over the activations instead
    of two, and gradients still reach ``c`` and ``bn`` through the fold. ``gelu``: a GELU follows (fused into the
    convolution by oneDNN for CPU inference, ``cpu_kernels``).
    """

    def __init__(
        self, cin: int, cout: int, kernel: int = 1, stride: int = 1, pad: int = 0, groups: int = 1, bn_init: float = 1.0
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))
        nn.init.constant_(self.bn.weight, bn_init)

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        if self.bn.training:
            out = self.bn(self.c(x))
            return gelu_fresh(out) if gelu else out
        return cpu_kernels.conv2d(x, *self.folded(), self.c, gelu)

    def folded(self) -> cpu_kernels.Folded:
        """The convolution's (weight, bias) with the batch norm's eval-mode affine map folded in."""
        scale = self.bn.weight * torch.rsqrt(self.bn.running_var + self.bn.eps)
        return self.c.weight * scale[:, None, None, None], self.bn.bias - self.bn.running_mean * scale


class PatchEmbed(nn.Module):
    """Two Conv-BN with a GELU between: (B, in_chans, S, S) -> (B, embed_dim, S / stride, S / stride).

    ``stride`` 1: 1x1 convolutions (LiteMedSAM); ``stride`` 4: two 3x3 convolutions of stride 2 (MobileSAM, TinyViT).
    """

    def __init__(self, in_chans: int, embed_dim: int, stride: int = 1) -> None:
        super().__init__()
        if stride not in (1, 4):
            raise ValueError(f"patch_stride must be 1 (LiteMedSAM) or 4 (MobileSAM), got {stride}")
        kernel, step, pad = (1, 1, 0) if stride == 1 else (3, 2, 1)
        self.stride = stride
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, kernel, step, pad),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, kernel, step, pad),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq[2](self.seq[0](x, gelu=True))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual add, GELU. (B, C, H, W) -> same.

    For CPU inference (float32, native bf16) the block runs in strips of rows that stay in cache
    (``cpu_kernels.mbconv``).
    """

    def __init__(self, dim: int, expand_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim, bn_init=0.0)  # zero-init: each block starts as the identity
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.strips_apply(x, self.conv1.c.out_channels) and not any(m.training for m in self.modules()):
            return cpu_kernels.mbconv(x, self.conv1.folded(), self.conv2.folded(), self.conv3.folded())
        if torch.onnx.is_in_onnx_export() and cpu_kernels.large_hidden(x, self.conv1.c.out_channels, 4):
            return _in_strips(x, self.conv1.folded(), self.conv2.folded(), self.conv3.folded(), 1, residual=True)
        out = self.conv3(self.conv2(self.conv1(x, gelu=True), gelu=True))
        return gelu_fresh(add_fresh(x, drop_path(out, self.drop_path, self.training)))


def _in_strips(
    x: torch.Tensor,
    expand: cpu_kernels.Folded,
    depthwise: cpu_kernels.Folded,
    project: cpu_kernels.Folded,
    stride: int,
    residual: bool,
) -> torch.Tensor:
    """``MBConv`` (``residual``: GELU(x + block(x))) or a patch merging's convolutions (the 3x3 depthwise one of
    ``stride``) as an ONNX graph of strips of output rows, concatenated: each strip's hidden activations are small
    enough to stay in cache between the graph's convolutions (``cpu_kernels.mbconv`` does the same in torch, with
    oneDNN's fused ops; the strips are as tall, ``cpu_kernels.strip_rows``). The convolutions gain on onnxruntime
    (their outputs stay in cache); its GELUs, compute-bound, do not.

    Output row r of the depthwise convolution (padding 1) reads hidden rows stride * r - 1 to stride * r + 1: those
    are recomputed from the input rows (a halo of a row or two), or are the convolution's zero padding at the image
    border. (B, C, H, W) -> (B, C', H', W'), every op a plain ONNX one.
    """
    height, width, hidden = x.shape[2], x.shape[3], expand[0].shape[0]
    out_height = (height - 1) // stride + 1
    rows = cpu_kernels.strip_rows(width, hidden, 4, stride)  # float32, the graph's dtype
    strips = []
    for top in range(0, out_height, rows):
        bottom = min(top + rows, out_height)
        low, high = stride * top - 1, stride * (bottom - 1) + 2  # the hidden rows the strip reads
        h = F.gelu(F.conv2d(x[:, :, max(low, 0) : min(high, height)], *expand))
        if low < 0 or high > height:  # zero rows for the convolution's padding, at the image border only
            h = F.pad(h, (0, 0, max(-low, 0), max(high - height, 0)))
        h = F.conv2d(F.gelu(F.conv2d(h, *depthwise, stride=stride, padding=(0, 1), groups=hidden)), *project)
        strips.append(F.gelu(x[:, :, top:bottom] + h) if residual else h)
    return torch.cat(strips, dim=2)


class PatchMerging(nn.Module):
    """1x1 conv, 3x3 depthwise conv of ``stride``, 1x1 conv (GELU between), to tokens.

    Input (B, C, H, W), or tokens (B, H * W, C) on the ``resolution`` (H, W) grid; output (B, H' * W', out_dim)
    with H' = H / stride. Token grids are handed to the convolutions as channels-last views (no copy). For CPU
    inference the convolutions run in strips of rows that stay in cache (``cpu_kernels.patch_merging``).
    """

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.view(x.shape[0], *self.resolution, x.shape[2]).permute(0, 3, 1, 2)
        if cpu_kernels.strips_apply(x, self.conv1.c.out_channels) and not any(m.training for m in self.modules()):
            folded = self.conv1.folded(), self.conv2.folded(), self.conv3.folded()
            x = cpu_kernels.patch_merging(x, *folded, stride=self.conv2.c.stride[0])
        elif torch.onnx.is_in_onnx_export() and cpu_kernels.large_hidden(x, self.conv1.c.out_channels, 4):
            folded = self.conv1.folded(), self.conv2.folded(), self.conv3.folded()
            x = _in_strips(x, *folded, self.conv2.c.stride[0], residual=False)
        else:
            x = self.conv3(self.conv2(self.conv1(x, gelu=True), gelu=True))
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


class ConvLayer(nn.Module):
    """Stage 0: ``depth`` MBConv blocks on (B, C, H, W), then a patch merging to tokens (B, H' * W', out_dim)."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        out_dim: int,
        stride: int,
        expand_ratio: float,
        drop_path: Sequence[float],
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio, drop_path[i]) for i in range(depth))
        self.downsample = PatchMerging(resolution, dim, out_dim, stride)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = _run(block, x, self.grad_checkpointing)
        return self.downsample(x)


class Mlp(nn.Module):
    """``fc2(GELU(fc1(norm(x))))`` on (..., C); ``forward_normed`` starts after ``norm`` (the block computes it once)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward_normed(self, m: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear(cpu_kernels.linear(m, self.fc1, gelu=True), self.fc2)

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

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.attn_ratio = attn_ratio
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.scale = key_dim**-0.5
        self.window_size = window_size
        self.attention_path = "auto"  # see common.biased_attention; TinyViT.set_attention_path
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
        qkv = cpu_kernels.linear(self.norm(x), self.qkv)  # (B, H, W, P * heads)
        fill = None
        if H % w or W % w:
            # the reference pads the tokens with zeros before the attention: a zero token normalises to norm.bias
            # and so carries qkv(norm(0)). Fill the padding with that row rather than run norm and qkv on it.
            fill = cpu_kernels.linear(self.norm(x.new_zeros(1, C)), self.qkv)[0]
        if torch.onnx.is_in_onnx_export():
            return self._exported(qkv, fill)
        # by copies into / out of fresh window buffers for inference (one pass each way, padding and cropping
        # included); by padding and reshapes where autograd, tracing, export or compiling sees the ops
        by_copy = _window_copies and cpu_kernels.compute_dtype(qkv) is not None
        windows = partition_windows(qkv, w, fill) if by_copy else _pad_and_partition(qkv, w, fill)
        G, nh, nw = windows.shape[0] * windows.shape[1] * windows.shape[2], windows.shape[1], windows.shape[2]
        q, k, v = windows.view(G, w * w, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        bias = self.attention_bias().to(q.dtype)[None]  # 4-D (1, heads, N, N): the fused CPU kernel needs 4-D
        out = biased_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias, self.scale, self.attention_path
        )  # (B * nh * nw, heads, N, d)
        grid = out.view(B, nh, nw, self.num_heads, w, w, self.d).permute(0, 1, 4, 2, 5, 3, 6)  # (B, nh, w, nw, w, ..)
        if by_copy:
            out = merge_windows(grid, H, W).view(B, H, W, self.dh)
        else:
            out = grid.reshape(B, nh * w, nw * w, self.dh)[:, :H, :W]  # proj is per token: crop first
        return cpu_kernels.linear(out, self.proj)

    def _exported(self, qkv: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
        """The attention after ``qkv`` as an ONNX graph with one transpose each way: (B, H, W, P * heads) -> (B, H, W, C).

        The windows and their heads go to the batch axes in one transpose and q, k, v are split from it, already in
        the (windows, heads, N, d) layout of the products; the output comes back in one transpose too. The eager
        path's graph (partition, split, a transpose each for q, k and v, one for the heads' output, one to merge
        the windows) cost 5-14 ms more per LiteMedSAM encoder call on onnxruntime's CPU provider (one thread, AMD
        EPYC, five runs; e.g. 576 -> 562 ms). Padding is by concatenation (``common.pad_to_windows``).
        """
        B, H, W, P = qkv.shape
        w, heads = self.window_size, self.num_heads
        padded = pad_to_windows(qkv, w, fill)
        nh, nw = padded.shape[1] // w, padded.shape[2] // w
        windows = padded.view(B, nh, w, nw, w, heads, P // heads).permute(0, 1, 3, 5, 2, 4, 6)
        q, k, v = windows.reshape(B * nh * nw, heads, w * w, P // heads).split([self.key_dim, self.key_dim, self.d], -1)
        out = biased_attention(q, k, v, self.attention_bias()[None], self.scale, "explicit")  # (G, heads, N, d)
        out = out.view(B, nh, nw, heads, w, w, self.d).permute(0, 1, 4, 2, 5, 3, 6)  # (B, nh, w, nw, w, heads, d)
        return cpu_kernels.linear(out.reshape(B, nh * w, nw * w, self.dh)[:, :H, :W], self.proj)


def _window_spans(size: int, w: int) -> list[tuple[slice, slice, int]]:
    """How a grid axis of ``size`` tiles into windows of ``w``: (grid slice, window slice, tokens per window) for
    the whole windows and, when ``w`` does not divide ``size``, for the last, partial one."""
    whole = size // w
    spans = [(slice(0, whole * w), slice(0, whole), w)] if whole else []
    if size % w:
        spans.append((slice(whole * w, size), slice(whole, whole + 1), size % w))
    return spans


def _grid_and_window_blocks(grid: torch.Tensor, windows: torch.Tensor, w: int):
    """Pairs of same-shaped views of a (B, H, W, ...) ``grid`` and a (B, nh, w, nw, w, ...) ``windows`` view that
    hold the same tokens: up to four blocks (whole / partial windows along each axis), padding left out."""
    for rows, window_rows, height in _window_spans(grid.shape[1], w):
        for cols, window_cols, width in _window_spans(grid.shape[2], w):
            block = grid[:, rows, cols].unflatten(2, (-1, width)).unflatten(1, (-1, height))
            yield block, windows[:, window_rows, :height, window_cols, :width]


def partition_windows(x: torch.Tensor, w: int, fill: torch.Tensor | None) -> torch.Tensor:
    """(B, H, W, C) -> (B, nh, nw, w, w, C) windows, padded at the bottom / right with the (C,) ``fill`` row.

    One copy into a fresh buffer, where padding then reshaping copies the activations twice; no autograd graph.
    """
    B, H, W, C = x.shape
    out = x.new_empty(B, -(-H // w), -(-W // w), w, w, C)
    windows = out.transpose(2, 3)  # (B, nh, w, nw, w, C): the window buffer seen in grid order
    for block, window_block in _grid_and_window_blocks(x, windows, w):
        window_block.copy_(block)
    if H % w:
        windows[:, -1, H % w :] = fill
    if W % w:
        windows[:, :, :, -1, W % w :] = fill
    return out


def merge_windows(windows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, nh, w, nw, w, ...) windows, seen in grid order -> a fresh (B, height, width, ...) grid, padding dropped."""
    out = windows.new_empty(windows.shape[0], height, width, *windows.shape[5:])
    for block, window_block in _grid_and_window_blocks(out, windows, windows.shape[2]):
        block.copy_(window_block)
    return out


def _pad_and_partition(qkv: torch.Tensor, w: int, fill: torch.Tensor | None) -> torch.Tensor:
    """``partition_windows`` by padding and reshaping: the ops autograd, tracing and compiling see (an ONNX export
    takes ``Attention._exported``)."""
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


class TinyViTBlock(nn.Module):
    """Window attention, depthwise local conv and MLP on (B, H * W, C) tokens of the ``resolution`` (H, W) grid.

    Adapter slots (docs/architecture.md), empty by default:

        h = x                                   # un-windowed tokens; attn applies its own norm
        a = attn(h)                             # windowed
        a = a + depth_branch(h)                 # ZeroSlot by default
        x = x + attn_adapter(a)                 # IdentitySlot by default
        x = local_conv(x)                       # 3x3 depthwise Conv-BN on the grid
        m = mlp.norm(x)
        x = x + mlp.forward_normed(m) + mlp_adapter(m)   # ZeroSlot by default

    An empty ZeroSlot's add is skipped (adding 0 changes no number; it would cost a pass over the activations).
    """

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int = 3,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.resolution = resolution
        self.window_size = window_size
        self.attn = Attention(dim, dim // num_heads, num_heads, attn_ratio=1.0, window_size=window_size)
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path
        self.depth_branch: nn.Module = ZeroSlot()
        self.attn_adapter: nn.Module = IdentitySlot()
        self.mlp_adapter: nn.Module = ZeroSlot()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.resolution
        B, L, C = x.shape
        h = x
        a = self.attn(h.view(B, H, W, C)).reshape(B, L, C)
        if not isinstance(self.depth_branch, ZeroSlot):
            a = a + self.depth_branch(h)
        if isinstance(self.attn_adapter, IdentitySlot):
            x = add_fresh(x, drop_path(a, self.drop_path, self.training))  # a is ours: add in its memory
        else:
            x = x + drop_path(self.attn_adapter(a), self.drop_path, self.training)  # an adapter's output may alias
        # (B, L, C) viewed as a channels-last (B, C, H, W) grid: the depthwise conv needs no transposed copy
        x = self.local_conv(x.view(B, H, W, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, L, C)
        m = self.mlp.norm(x)
        branch = self.mlp.forward_normed(m)
        if not isinstance(self.mlp_adapter, ZeroSlot):
            branch = branch + self.mlp_adapter(m)
        return add_fresh(x, drop_path(branch, self.drop_path, self.training))


class BasicLayer(nn.Module):
    """Stages 1..3: ``depth`` attention blocks on (B, H * W, C) tokens, then an optional patch merging."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        drop_path: Sequence[float],
        out_dim: int | None,
        stride: int,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, resolution, num_heads, window_size, mlp_ratio, local_conv_size, drop_path[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim, out_dim, stride) if out_dim is not None else None
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = _run(block, x, self.grad_checkpointing)
        return self.downsample(x) if self.downsample is not None else x


def _run(block: nn.Module, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    if grad_checkpointing and torch.is_grad_enabled():
        # recompute in backward; RNG state (stochastic depth) is replayed. Batch norms in train mode would update
        # their running statistics twice: keep them in eval mode when checkpointing (the trainer does).
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


class TinyViT(nn.Module):
    """TinyViT-SAM image encoder: (B, in_chans, img_size, img_size) -> (B, 256, grid, grid).

    ``grid`` = img_size / (4 * patch_stride): 64 for LiteMedSAM (256, patch_stride 1) and MobileSAM (1024, 4).
    LiteMedSAM's input is a min-max scaled [0, 1] image; MobileSAM's is SAM-normalised (the caller's job).

    Args:
        img_size: side of the square input; divisible by 4 * patch_stride.
        in_chans: input channels.
        embed_dims, depths, num_heads, window_sizes: per stage; stage 0 is convolutional (its heads and window are
            unused), the others are attention stages. The stride-2 patch mergings follow every stage but the last
            two; the merging before the last stage has stride 1.
        mlp_ratio: MLP hidden width / dim in the attention blocks.
        mbconv_expand_ratio: hidden width / dim in stage 0's MBConv blocks.
        local_conv_size: kernel of the depthwise conv between attention and MLP.
        drop_path_rate: stochastic depth, growing linearly over the blocks up to this rate (0: off; inert in eval).
        patch_stride: 1 for LiteMedSAM's 1x1 patch embedding, 4 for MobileSAM's two 3x3 stride-2 convolutions.
        num_classes: > 0 adds TinyViT's classification head (``norm_head``, ``head``), unused by ``forward``, only so
            that checkpoints carrying it (MobileSAM: 1000) load strictly.
        use_checkpoint: gradient checkpointing per block (see ``set_grad_checkpointing``).
    """

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        drop_path_rate: float = 0.0,
        patch_stride: int = 1,
        num_classes: int = 0,
        use_checkpoint: bool = False,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        stages = len(embed_dims)
        if stages < 3 or not len(depths) == len(num_heads) == len(window_sizes) == stages:
            raise ValueError("embed_dims, depths, num_heads and window_sizes need one entry per stage (3 or more)")
        total_stride = patch_stride * 2 ** (stages - 2)
        if img_size % total_stride:
            raise ValueError(f"img_size {img_size} must be divisible by {total_stride} for this configuration")
        self.img_size = img_size
        self.patch_stride = patch_stride
        self.grid = img_size // total_stride
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], patch_stride)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        side = img_size // patch_stride
        self.layers = nn.ModuleList()
        for i, dim in enumerate(embed_dims):
            # every stage halves the grid except the last, which keeps the previous stage's grid (TinyViT-SAM)
            resolution = (side, side)
            stride = 1 if i == stages - 2 else 2
            out_dim = embed_dims[i + 1] if i < stages - 1 else None
            rate = rates[sum(depths[:i]) : sum(depths[: i + 1])]
            if i == 0:
                layer: nn.Module = ConvLayer(dim, resolution, depths[0], out_dim, stride, mbconv_expand_ratio, rate)
            else:
                layer = BasicLayer(
                    dim,
                    resolution,
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    local_conv_size,
                    rate,
                    out_dim,
                    stride,
                )
            self.layers.append(layer)
            if out_dim is not None:
                side //= stride
        if num_classes > 0:
            self.norm_head = nn.LayerNorm(embed_dims[-1])
            self.head = nn.Linear(embed_dims[-1], num_classes)
        self.apply(_init_weights)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.set_grad_checkpointing(use_checkpoint)

    @property
    def use_checkpoint(self) -> bool:
        return self.layers[0].grad_checkpointing

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass: less memory, about one more forward of time."""
        for layer in self.layers:
            layer.grad_checkpointing = enabled

    def set_attention_path(self, path: str = "auto") -> None:
        """``auto`` (default), ``fused``, ``explicit`` or ``graph`` for every window attention
        (``common.biased_attention``)."""
        if path not in ATTENTION_PATHS:
            raise ValueError(f"unknown attention path {path!r}; choose one of {', '.join(ATTENTION_PATHS)}")
        for module in self.modules():
            if isinstance(module, Attention):
                module.attention_path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last convolutions are 2-3x faster on CPU (oneDNN), and token grids are channels-last already
        x = x.contiguous(memory_format=torch.channels_last)
        stages = [self.patch_embed, *self.layers]
        # leading stages with nothing to train run without autograd: the backward pass would not reach them, and
        # their activations (the largest, at the finest grid) are then freed at once instead of kept
        frozen = frozen_prefix(stages, x)
        with torch.no_grad():
            for stage in stages[:frozen]:
                x = stage(x)
        for stage in stages[frozen:]:
            x = stage(x)
        B, _, C = x.shape
        x = self.neck(x.view(B, self.grid, self.grid, C).permute(0, 3, 1, 2))
        return x.contiguous()  # plain (B, 256, grid, grid) for callers that .view() it


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def tiny_vit_5m(img_size: int = 256) -> TinyViT:
    """LiteMedSAM's image encoder (TinyViT-5M, 1x1 patch embedding): grid img_size / 4, 64 at 256."""
    return TinyViT(
        img_size=img_size,
        embed_dims=(64, 128, 160, 320),
        depths=(2, 2, 6, 2),
        num_heads=(2, 4, 5, 10),
        window_sizes=(7, 7, 14, 7),
        mlp_ratio=4.0,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
    )


def mobile_sam_tiny_vit(img_size: int = 1024) -> TinyViT:
    """MobileSAM's image encoder (TinyViT-5M, stride-4 patch embedding, classification head kept for loading)."""
    return TinyViT(
        img_size=img_size,
        embed_dims=(64, 128, 160, 320),
        depths=(2, 2, 6, 2),
        num_heads=(2, 4, 5, 10),
        window_sizes=(7, 7, 14, 7),
        mlp_ratio=4.0,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        patch_stride=4,
        num_classes=1000,
    )
