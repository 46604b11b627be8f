"""CPU inference forms of TinyViT's window attention: oneDNN Graph's fused attention, and windows cut and merged
back by one copy each way.

oneDNN Graph's fused attention (``graph_attention``) is reached through torch.jit's oneDNN Graph (LLGA) bridge, the
one route to it from Python (in float32 torch's fused CPU attention and ``bmm`` call MKL's sgemm: MKL_VERBOSE).
``biased_attention`` adds it to the paths of ``models.common.biased_attention`` as ``graph``, and ``auto`` takes it
for CPU inference on windows of ``GRAPH_MIN_TOKENS`` or more.
"""

from __future__ import annotations

import functools
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from samadapt.accel import kernels
from samadapt.models import common

ATTENTION_PATHS = (*common.ATTENTION_PATHS, "graph")
# tokens per window from which oneDNN Graph's fused attention beats the other paths on the CPU, one slice, one
# thread: TinyViT's 14 x 14 windows (196; 25 windows x 5 heads) fp32 8.6 -> 4.5 ms against fused (6.1 -> 2.8 at two
# threads), bf16 6.5 -> 3.4 ms against explicit; on 7 x 7 windows (49) it is no faster
GRAPH_MIN_TOKENS = 196


def biased_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, path: str = "auto"
) -> torch.Tensor:
    """``models.common.biased_attention`` with one more path, ``graph``: oneDNN Graph's fused attention
    (``graph_attention``), for CPU inference in float32 or native bf16 only (elsewhere ``fused``).

    ``auto`` takes ``graph`` for CPU inference on windows of ``GRAPH_MIN_TOKENS`` or more, where it measured fastest;
    otherwise what ``common.biased_attention`` takes. ``graph`` is within 1e-6 of ``fused`` in float32, and in bf16
    between the two against float32 (stage 2's windows, bench/attention_paths.py --inference: 0.9 %, explicit 1.1 %,
    fused 0.5 %; the whole LiteMedSAM bf16 encoder: 4.09 %, explicit 4.07 %, fused 4.04 %).
    """
    takes_graph = q.device.type == "cpu" and q.shape[-2] >= GRAPH_MIN_TOKENS and graph_attention_takes(q)
    if path == "graph" or (path == "auto" and takes_graph):
        return graph_attention(q, k, v, bias, scale)
    return common.biased_attention(q, k, v, bias, scale, path)


def graph_attention_available() -> bool:
    """Whether oneDNN Graph can be reached: torch.jit's LLGA bridge in a torch built with oneDNN, and no compile of
    it has failed in this process."""
    return not _graph_failed and torch.backends.mkldnn.is_available() and hasattr(torch._C, "_jit_set_llga_enabled")


def graph_attention_takes(q: torch.Tensor) -> bool:
    """Whether ``graph_attention`` runs oneDNN Graph for this q: CPU inference (``kernels.compute_dtype``) in q's own
    dtype, float32 or native bfloat16."""
    return kernels.compute_dtype(q) == q.dtype and graph_attention_available()


class _BiasedAttention(nn.Module):
    """softmax(q k^T * scale + bias) v, written out for oneDNN Graph to find its fused attention pattern."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale + bias, dim=-1), v)


_fusion_switch = threading.Lock()
# what this torch can do, not a mode: set by the first failed compile (``_give_up_graph``), never cleared
_graph_failed = False
_Signature = tuple[tuple[tuple[int, ...], tuple[int, ...], torch.dtype], ...]


@functools.lru_cache(maxsize=32)
def _attention_graph(signature: _Signature, scale: float) -> torch.jit.ScriptModule:
    """The attention traced for inputs of these (shape, stride, dtype) and compiled with oneDNN Graph fusion on.

    The fusion runs while the traced graph is optimised (its first calls), so the process-wide switch is on only for
    those calls; other inputs than the traced ones fall back to the plain ops (the graph's own guard).
    """
    examples = [torch.empty_strided(shape, stride, dtype=dtype).zero_() for shape, stride, dtype in signature]
    with _fusion_switch:  # one compile at a time: each leaves the process-wide switch as it found it
        return _compile_attention(examples, scale)


def _compile_attention(examples: list[torch.Tensor], scale: float) -> torch.jit.ScriptModule:
    was_enabled = torch._C._jit_llga_enabled()
    torch._C._jit_set_llga_enabled(True)
    try:
        with warnings.catch_warnings(), torch.no_grad(), torch.autocast("cpu", enabled=False):
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; no other route to oneDNN Graph
            graph = torch.jit.freeze(torch.jit.trace(_BiasedAttention(scale).eval(), tuple(examples)))
            for _ in range(2):  # profile, then optimise: the fused partition is built here
                graph(*examples)
    finally:
        torch._C._jit_set_llga_enabled(was_enabled)
    return graph


def graph_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v by oneDNN Graph's fused attention, in q's dtype (float32, or bfloat16: closer
    to float32 than the explicit bf16 form, ``biased_attention``).

    Compiled once per input layout (about 0.2 s); where it must not be used (``graph_attention_takes``) it is
    ``scaled_dot_product_attention``.
    """
    if not graph_attention_takes(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    signature = tuple((tuple(t.shape), tuple(t.stride()), t.dtype) for t in (q, k, v, bias))
    try:
        graph = _attention_graph(signature, scale)
    except Exception as error:  # noqa: BLE001 - a deprecated bridge: a torch that breaks it keeps the fused kernel
        _give_up_graph(error)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    with torch.autocast("cpu", enabled=False):  # the traced graph must not get autocast's casts inserted
        return graph(q, k, v, bias)


def _give_up_graph(error: Exception) -> None:
    """A failed compile turns the oneDNN Graph attention off for the process, once, with a warning that says why."""
    global _graph_failed
    _graph_failed = True
    warnings.warn(
        f"oneDNN Graph attention could not be compiled ({type(error).__name__}: {error}); window attention uses "
        "torch's fused kernel from now on",
        RuntimeWarning,
        stacklevel=3,
    )


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
    """(B, H, W, C) -> (B, nh, nw, w, w, C) windows, padded at the bottom / right with the (C,) ``fill`` row: the
    numbers of ``tiny_vit_attention.pad_and_partition``, bit for bit.

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
