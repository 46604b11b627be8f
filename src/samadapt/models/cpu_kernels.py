"""oneDNN's convolution and linear kernels, with GELU fused, for CPU inference: the same function, faster.

Eager torch leaves speed on the table on the CPU in two places (bench/encoder_bound.py, docs/performance.md):

- float32 ``Linear`` goes through MKL's sgemm and a one-thread 1x1 convolution through THNN + sgemm; on the AMD
  EPYC these benches ran on, MKL reached 116 GFLOP/s on a 2048 x 2048 product and oneDNN 256 GFLOP/s (one thread,
  the same numbers within float rounding). bfloat16 already goes through oneDNN.
- a GELU after a convolution or linear is a second pass over a fresh activation; oneDNN applies it as a post-op
  while the output is still in cache (erf GELU, the function of ``F.gelu``).

A third kernel, for the window attention: oneDNN Graph's fused attention (``graph_attention``), reached through
torch.jit's oneDNN Graph (LLGA) bridge, the one route to it from Python (in float32 torch's fused CPU attention and
``bmm`` call MKL's sgemm: MKL_VERBOSE).

Taken only where nothing else can see the difference: a CPU tensor, no autograd (the fused ops have no backward),
float32 or bfloat16 autocast on a CPU with native bf16 kernels, no dispatch mode (FLOP counting, fake tensors,
export) and no tracing, scripting, compiling or ONNX export; everywhere else the ordinary modules run. Switch:
``set_fused_cpu_kernels(False)``.
"""

from __future__ import annotations

import functools
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from samadapt.precision import fast_bfloat16

_enabled = True


def set_fused_cpu_kernels(enabled: bool = True) -> None:
    """Turn the oneDNN inference kernels on (default) or off, process-wide (off: plain torch ops everywhere)."""
    global _enabled
    _enabled = enabled


@functools.cache
def _available() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops, "_convolution_pointwise")
    )


def compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the fused kernels would compute ``x``'s op in, or None where they must not be used."""
    if torch.compiler.is_compiling():  # first: torch.compile then traces none of the checks below (no graph breaks)
        return None
    if not _enabled or x.device.type != "cpu" or torch.is_grad_enabled() or not _available():
        return None
    if _get_current_dispatch_mode() is not None or torch.jit.is_tracing() or torch.jit.is_scripting():
        return None
    if torch.onnx.is_in_onnx_export():
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if dtype == torch.float32 and x.dtype == torch.float32:
        return dtype
    if dtype == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16) and fast_bfloat16("cpu"):
        return dtype
    return None


def _gelu_args(gelu: bool) -> tuple[str, list, str]:
    return ("gelu", [], "none") if gelu else ("none", [], "")


def conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d, gelu: bool = False
) -> torch.Tensor:
    """``F.conv2d`` with ``conv``'s stride, padding, dilation and groups, then GELU if ``gelu``; fused where it may."""
    dtype = compute_dtype(x)
    if dtype is None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return (torch.ops.aten.gelu_(out) if not out.requires_grad else F.gelu(out)) if gelu else out
    bias = bias.to(dtype) if bias is not None else None
    return torch.ops.mkldnn._convolution_pointwise(
        x.to(dtype), weight.to(dtype), bias, conv.padding, conv.stride, conv.dilation, conv.groups, *_gelu_args(gelu)
    )


def linear(x: torch.Tensor, layer: nn.Module, gelu: bool = False) -> torch.Tensor:
    """``layer(x)``, then GELU if ``gelu``; fused when ``layer`` is a plain ``nn.Linear``. A layer that
    ``accepts_base_product`` (LoRA) gets ``dense`` for its base product, so with LoRA off it computes the plain
    layer's numbers exactly."""
    fused = compute_dtype(x) is not None
    if fused and type(layer) is nn.Linear:
        return dense(x, layer.weight, layer.bias, gelu)
    out = layer(x, base_product=dense) if fused and getattr(layer, "accepts_base_product", False) else layer(x)
    return (torch.ops.aten.gelu_(out) if not out.requires_grad else F.gelu(out)) if gelu else out


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, then GELU if ``gelu``; by oneDNN where it may (``compute_dtype``)."""
    dtype = compute_dtype(x)
    if dtype is None:
        out = F.linear(x, weight, bias)
        return (torch.ops.aten.gelu_(out) if not out.requires_grad else F.gelu(out)) if gelu else out
    bias = bias.to(dtype) if bias is not None else None
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight.to(dtype), bias, *_gelu_args(gelu))


@functools.cache
def graph_attention_available() -> bool:
    """Whether oneDNN Graph can be reached: torch.jit's LLGA bridge in a torch built with oneDNN."""
    return torch.backends.mkldnn.is_available() and hasattr(torch._C, "_jit_set_llga_enabled")


def graph_attention_takes(q: torch.Tensor) -> bool:
    """Whether ``graph_attention`` runs oneDNN Graph for this q: CPU inference (``compute_dtype``) in q's own dtype,
    float32 or native bfloat16."""
    return compute_dtype(q) == q.dtype and graph_attention_available()


class _BiasedAttention(nn.Module):
    """softmax(q k^T * scale + bias) v, written out for oneDNN Graph to find its fused attention pattern."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale + bias, dim=-1), v)


_fusion_switch = threading.Lock()
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
    """softmax(q k^T * scale + bias) v by oneDNN Graph's fused attention (``common.biased_attention``), in q's
    dtype (float32, or bfloat16: closer to float32 than the explicit bf16 form, ``common.biased_attention``).

    Compiled once per input layout (about 0.2 s); where it must not be used (``graph_attention_takes``) it is
    ``scaled_dot_product_attention``.
    """
    if not graph_attention_takes(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    signature = tuple((tuple(t.shape), tuple(t.stride()), t.dtype) for t in (q, k, v, bias))
    with torch.autocast("cpu", enabled=False):  # the traced graph must not get autocast's casts inserted
        return _attention_graph(signature, scale)(q, k, v, bias)
