"""oneDNN's convolution and linear kernels, with GELU fused, for CPU inference: the same function, faster.

Eager torch leaves speed on the table on the CPU in two places (bench/encoder_bound.py, docs/performance.md):

- float32 ``Linear`` goes through MKL's sgemm and a one-thread 1x1 convolution through THNN + sgemm; on the AMD
  EPYC these benches ran on, MKL reached 116 GFLOP/s on a 2048 x 2048 product and oneDNN 256 GFLOP/s (one thread,
  the same numbers within float rounding). bfloat16 already goes through oneDNN.
- a GELU after a convolution or linear is a second pass over a fresh activation; oneDNN applies it as a post-op
  while the output is still in cache (erf GELU, the function of ``F.gelu``).

Taken only where nothing else can see the difference: a CPU tensor, no autograd (the fused ops have no backward),
float32 or bfloat16 autocast on a CPU with native bf16 kernels, no dispatch mode (FLOP counting, fake tensors,
export) and no tracing, scripting, compiling or ONNX export; everywhere else the ordinary modules run. Switch:
``set_fused_cpu_kernels(False)``.

``mbconv`` runs a whole inverted-residual block (TinyViT's stage 0) in strips of rows, so that its 4x wider hidden
activations stay in cache instead of making two round trips to memory (float32 and bf16 autocast; switch
``set_tiled_mbconv``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from samadapt.precision import fast_bfloat16

_enabled = True
_tiled = True

# hidden activation per strip of ``mbconv``: 16 rows of LiteMedSAM's 256 x 256 x 256 stage 0 in float32, 32 in bf16.
# Best of 1 to 8 MiB (one thread, AMD EPYC with 1 MiB of L2 per core and 32 MiB of L3): smaller strips recompute more
# halo rows and pay more per-call overhead, larger ones fall out of cache.
STRIP_BYTES = 4 * 2**20


def set_fused_cpu_kernels(enabled: bool = True) -> None:
    """Turn the oneDNN inference kernels on (default) or off, process-wide (off: plain torch ops everywhere)."""
    global _enabled
    _enabled = enabled


def set_tiled_mbconv(enabled: bool = True) -> None:
    """Run MBConv blocks in strips of rows (on, default; only where ``mbconv_tiles``) or whole (off), process-wide."""
    global _tiled
    _tiled = enabled


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


Folded = tuple[torch.Tensor, torch.Tensor]  # a convolution's (weight, bias) with its batch norm folded in


def mbconv_tiles(x: torch.Tensor) -> bool:
    """Whether ``mbconv`` may run on ``x``: a channels-last (B, C, H, W) tensor (its strips of rows are then
    contiguous), for inference where the fused kernels may (``compute_dtype``: float32 or bf16), tiling on."""
    return (
        _tiled
        and compute_dtype(x) is not None
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and hasattr(torch.ops.mkldnn._convolution_pointwise, "binary")
    )


def mbconv(x: torch.Tensor, expand: Folded, depthwise: Folded, project: Folded) -> torch.Tensor:
    """GELU(x + project(GELU(depthwise(GELU(expand(x)))))) on channels-last (B, C, H, W) ``x``, for 1x1 ``expand``
    (C -> hidden) and ``project`` (hidden -> C) and a 3x3 depthwise convolution of padding 1, each (weight, bias).

    The same function as the three convolutions run whole, computed for ``STRIP_BYTES`` of hidden activation at a
    time: each strip of rows goes through all of them while it is in cache. The convolutions compute in
    ``compute_dtype(x)`` (bf16 under autocast), the residual add and the last GELU in ``x``'s dtype, as the whole
    block does. Call only where ``mbconv_tiles(x)``.
    """
    dtype = compute_dtype(x)
    expand, depthwise, project = ((w.to(dtype), b.to(dtype)) for w, b in (expand, depthwise, project))
    batch, _, height, width = x.shape
    rows = max(1, STRIP_BYTES // (width * expand[0].shape[0] * expand[0].element_size()))
    out = torch.empty_like(x)
    for image in range(batch):
        for top in range(0, height, rows):
            bottom = min(top + rows, height)
            out[image : image + 1, :, top:bottom].copy_(
                _mbconv_strip(x[image : image + 1], top, bottom, expand, depthwise, project)
            )
    return out


def _mbconv_strip(
    x: torch.Tensor, top: int, bottom: int, expand: Folded, depthwise: Folded, project: Folded
) -> torch.Tensor:
    """Rows [top, bottom) of ``mbconv`` for one image ``x`` (1, C, H, W), the convolutions in their weights' dtype."""
    # the 3x3 convolution needs one row of hidden activation above and below the strip: recomputed (a 16-row strip
    # costs 2 / 16 more expansion, cheaper than stitching the neighbours' rows in). At the image border the
    # depthwise convolution's own zero padding stands for the missing row, as it does for the whole image.
    low, high = max(top - 1, 0), min(bottom + 1, x.shape[2])
    hidden = _conv(x[:, :, low:high].to(expand[0].dtype), *expand, padding=0, groups=1, gelu=True)
    hidden = _conv(hidden, *depthwise, padding=1, groups=hidden.shape[1], gelu=True)
    hidden = hidden[:, :, top - low : bottom - low]
    residual = x[:, :, top:bottom]
    if hidden.dtype == residual.dtype:  # the residual added by oneDNN as the projection's post-op
        out = torch.ops.mkldnn._convolution_pointwise.binary(
            hidden, residual, *project, [0, 0], [1, 1], [1, 1], 1, "add", 1.0, None, [], ""
        )
    else:  # bf16 autocast on a float32 input: added in float32, as the whole block adds its bf16 branch
        out = residual + _conv(hidden, *project, padding=0, groups=1, gelu=False)
    # oneDNN takes no GELU after the residual add; as the post-op of an identity (1x1, one weight per channel)
    # convolution it costs a third of aten's gelu_ on this strip
    identity = out.new_ones(out.shape[1], 1, 1, 1)
    return _conv(out, identity, None, padding=0, groups=out.shape[1], gelu=True)


def _conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, groups: int, gelu: bool
) -> torch.Tensor:
    pad = [padding, padding]
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, pad, [1, 1], [1, 1], groups, *_gelu_args(gelu))
