"""oneDNN's convolution and linear kernels, with GELU fused, for CPU inference: the same function, faster.

Eager torch leaves speed on the table on the CPU in two places (bench/encoder_bound.py, docs/performance.md):

- float32 ``Linear`` goes through MKL's sgemm and a one-thread 1x1 convolution through THNN + sgemm; on the AMD
  EPYC these benches ran on, MKL reached 116 GFLOP/s on a 2048 x 2048 product and oneDNN 256 GFLOP/s (one thread,
  the same numbers within float rounding). bfloat16 already goes through oneDNN.
- a GELU after a convolution or linear is a second pass over a fresh activation; oneDNN applies it as a post-op
  while the output is still in cache (erf GELU, the function of ``F.gelu``).

Each function has the signature of the plain form in ``models.common`` (``linear``, ``dense``, ``conv2d``), which
it is where the kernels must not run: they are taken only where nothing else can see the difference (a CPU tensor,
no autograd (the fused ops have no backward), float32 or bfloat16 autocast on a CPU with native bf16 kernels, no
dispatch mode (FLOP counting, fake tensors, export) and no tracing, scripting, compiling or ONNX export). The
accelerated modules (``accel.cpu``) put them in the models' product hooks.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from samadapt.models import common
from samadapt.models.common import gelu_fresh
from samadapt.precision import fast_bfloat16


@functools.cache
def available() -> bool:
    """Whether this torch reaches oneDNN's fused convolution and linear ops."""
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
    if x.device.type != "cpu" or torch.is_grad_enabled() or not available():
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


def gelu_args(gelu: bool) -> tuple[str, list, str]:
    """The post-op arguments of oneDNN's pointwise ops: erf GELU, or none."""
    return ("gelu", [], "none") if gelu else ("none", [], "")


def conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d, gelu: bool = False
) -> torch.Tensor:
    """``common.conv2d``: ``F.conv2d`` with ``conv``'s stride, padding, dilation and groups, then GELU if ``gelu``;
    fused where it may."""
    dtype = compute_dtype(x)
    if dtype is None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return common.conv2d(x, weight, bias, conv, gelu)
    bias = bias.to(dtype) if bias is not None else None
    return torch.ops.mkldnn._convolution_pointwise(
        x.to(dtype), weight.to(dtype), bias, conv.padding, conv.stride, conv.dilation, conv.groups, *gelu_args(gelu)
    )


def linear(x: torch.Tensor, layer: nn.Module, gelu: bool = False) -> torch.Tensor:
    """``common.linear``: ``layer(x)``, then GELU if ``gelu``; fused when ``layer`` is a plain ``nn.Linear``. A layer
    that ``accepts_base_product`` (LoRA) gets ``dense`` for its base product, so with LoRA off it computes the plain
    layer's numbers exactly."""
    fused = compute_dtype(x) is not None
    if fused and type(layer) is nn.Linear:
        return dense(x, layer.weight, layer.bias, gelu)
    if fused and getattr(layer, "accepts_base_product", False):
        out = layer(x, base_product=dense)
        return gelu_fresh(out) if gelu else out
    return common.linear(x, layer, gelu)


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """``common.dense``: ``F.linear(x, weight, bias)``, then GELU if ``gelu``; by oneDNN where it may
    (``compute_dtype``)."""
    dtype = compute_dtype(x)
    if dtype is None:
        return common.dense(x, weight, bias, gelu)
    bias = bias.to(dtype) if bias is not None else None
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight.to(dtype), bias, *gelu_args(gelu))
