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

``mbconv`` runs a whole inverted-residual block (TinyViT's stage 0) in strips of rows, so that its 4x wider hidden
activations stay in cache and are never allocated whole; ``patch_merging`` does the same for the patch merging after
it (float32 and bf16; switch ``set_conv_strips``). Most of what this saved on the EPYC of issue 14 was the page faults
of the fresh 32 and 64 MiB buffers the whole blocks ask for on every call: with glibc told to keep freed memory
(MALLOC_MMAP_MAX_=0 and a large MALLOC_TRIM_THRESHOLD_) the whole blocks ran as fast.
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
_strips = True

# hidden activation per strip of ``mbconv`` and ``patch_merging``: 16 rows of LiteMedSAM's 256 x 256 x 256 stage 0
# in float32, 32 in bf16. Best of 1 to 8 MiB (one thread, AMD EPYC with 1 MiB of L2 per core and 32 MiB of L3):
# smaller strips recompute more halo rows and pay more per-call overhead, larger ones fall out of cache. The ONNX
# export's strips (``tiny_vit._in_strips``) measured best at the same size on onnxruntime: 4, 8, 16, 32 rows ->
# 557, 544 / 562, 541 / 552, 548 ms per encoder call, whole blocks 565 / 579 (one thread, two runs).
STRIP_BYTES = 4 * 2**20
# blocks whose hidden activation (one image) is at most this run whole: strips were slower there (LiteMedSAM's later
# patch mergings, 10 and 5 MiB in float32: 5.4 -> 5.7 and 6.0 -> 6.5 ms, one thread); its stage 0 has 32 and 64 MiB
WHOLE_BYTES = 16 * 2**20


def set_fused_cpu_kernels(enabled: bool = True) -> None:
    """Turn the oneDNN inference kernels on (default) or off, process-wide (off: plain torch ops everywhere)."""
    global _enabled
    _enabled = enabled


def set_conv_strips(enabled: bool = True) -> None:
    """Run TinyViT's MBConv and patch merging in strips of rows (on, default; only where ``strips_apply``) or whole
    (off), process-wide."""
    global _strips
    _strips = enabled


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


def large_hidden(x: torch.Tensor, hidden: int, itemsize: int) -> bool:
    """Whether a block expanding (B, C, H, W) ``x`` to ``hidden`` channels of ``itemsize`` bytes should run in strips:
    its hidden activation (one image) is over ``WHOLE_BYTES``."""
    return x.shape[2] * x.shape[3] * hidden * itemsize > WHOLE_BYTES


def strip_rows(width: int, hidden: int, itemsize: int, stride: int) -> int:
    """Output rows per strip: ``STRIP_BYTES`` of hidden activation (``hidden`` channels of ``itemsize`` bytes, on
    input rows ``width`` wide, ``stride`` of them per output row), at least one."""
    return max(1, STRIP_BYTES // (width * hidden * itemsize * stride))


def strips_apply(x: torch.Tensor, hidden: int) -> bool:
    """Whether ``mbconv`` and ``patch_merging`` with ``hidden`` channels after the expansion should run on ``x``: a
    channels-last (B, C, H, W) tensor (its strips of rows are then contiguous), for inference where the fused kernels
    may (``compute_dtype``: float32 or bf16), a hidden activation over ``WHOLE_BYTES`` per image, strips on."""
    dtype = compute_dtype(x)
    return (
        _strips
        and dtype is not None
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and large_hidden(x, hidden, dtype.itemsize)
        and hasattr(torch.ops.mkldnn._convolution_pointwise, "binary")
    )


def mbconv(x: torch.Tensor, expand: Folded, depthwise: Folded, project: Folded) -> torch.Tensor:
    """GELU(x + project(GELU(depthwise(GELU(expand(x)))))) on channels-last (B, C, H, W) ``x``, for 1x1 ``expand``
    (C -> hidden) and ``project`` (hidden -> C) and a 3x3 depthwise convolution of padding 1, each (weight, bias).

    The same function as the three convolutions run whole, computed for ``STRIP_BYTES`` of hidden activation at a
    time: each strip of rows goes through all of them while it is in cache. The convolutions compute in
    ``compute_dtype(x)`` (bf16 under autocast), the residual add and the last GELU in ``x``'s dtype, as the whole
    block does. Call only where ``strips_apply``.
    """
    return _in_strips(x, expand, depthwise, project, stride=1, residual=True)


def patch_merging(x: torch.Tensor, expand: Folded, depthwise: Folded, project: Folded, stride: int) -> torch.Tensor:
    """project(GELU(depthwise(GELU(expand(x))))) on channels-last (B, C, H, W) ``x`` -> (B, C', H', W'), channels-last,
    in ``compute_dtype(x)``: 1x1 ``expand`` and ``project``, a 3x3 depthwise convolution of ``stride`` and padding 1,
    in strips of rows as ``mbconv``. Call only where ``strips_apply``."""
    return _in_strips(x, expand, depthwise, project, stride, residual=False)


def _in_strips(
    x: torch.Tensor, expand: Folded, depthwise: Folded, project: Folded, stride: int, residual: bool
) -> torch.Tensor:
    dtype = compute_dtype(x)
    expand, depthwise, project = ((w.to(dtype), b.to(dtype)) for w, b in (expand, depthwise, project))
    batch, _, height, width = x.shape
    out_height, out_width = (height - 1) // stride + 1, (width - 1) // stride + 1  # 3x3, padding 1
    rows = strip_rows(width, expand[0].shape[0], expand[0].element_size(), stride)
    shape = (batch, project[0].shape[0], out_height, out_width)
    out = torch.empty(shape, dtype=x.dtype if residual else dtype, device=x.device, memory_format=torch.channels_last)
    for image in range(batch):
        for top in range(0, out_height, rows):
            bottom = min(top + rows, out_height)
            strip = _strip(x[image : image + 1], top, bottom, expand, depthwise, project, stride, residual)
            out[image : image + 1, :, top:bottom].copy_(strip)
    return out


def _strip(
    x: torch.Tensor,
    top: int,
    bottom: int,
    expand: Folded,
    depthwise: Folded,
    project: Folded,
    stride: int,
    residual: bool,
) -> torch.Tensor:
    """Output rows [top, bottom) of ``_in_strips`` for one image ``x`` (1, C, H, W)."""
    # output row r of the 3x3 convolution (padding 1) reads input rows stride * r - 1 to stride * r + 1, so a strip's
    # hidden activation overlaps its neighbours' by a row or two: recomputed (a 16-row strip costs 2 / 16 more
    # expansion; stitching the neighbours' rows in was slower). The strip starts one output row early, on an input
    # row that is a multiple of stride, so that its rows line up with the whole image's; that extra row reads the
    # convolution's zero padding and is dropped. At the image border the padding stands for the missing rows, as it
    # does for the whole image.
    low, high = stride * max(top - 1, 0), min(stride * (bottom - 1) + 2, x.shape[2])
    hidden = _conv(x[:, :, low:high].to(expand[0].dtype), *expand, padding=0, stride=1, groups=1, gelu=True)
    hidden = _conv(hidden, *depthwise, padding=1, stride=stride, groups=hidden.shape[1], gelu=True)
    hidden = hidden[:, :, top - low // stride : bottom - low // stride]
    if not residual:
        return _conv(hidden, *project, padding=0, stride=1, groups=1, gelu=False)
    shortcut = x[:, :, top:bottom]
    if hidden.dtype == shortcut.dtype:  # the residual added by oneDNN as the projection's post-op
        out = torch.ops.mkldnn._convolution_pointwise.binary(
            hidden, shortcut, *project, [0, 0], [1, 1], [1, 1], 1, "add", 1.0, None, [], ""
        )
    else:  # bf16 autocast on a float32 input: added in float32, as the whole block adds its bf16 branch
        out = shortcut + _conv(hidden, *project, padding=0, stride=1, groups=1, gelu=False)
    # oneDNN takes no GELU after the residual add; as the post-op of an identity (1x1, one weight per channel)
    # convolution it costs a third of aten's gelu_ on this strip
    identity = out.new_ones(out.shape[1], 1, 1, 1)
    return _conv(out, identity, None, padding=0, stride=1, groups=out.shape[1], gelu=True)


def _conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: int,
    stride: int,
    groups: int,
    gelu: bool,
) -> torch.Tensor:
    pad, step = [padding, padding], [stride, stride]
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, pad, step, [1, 1], groups, *_gelu_args(gelu))


def graph_attention_available() -> bool:
    """Whether oneDNN Graph can be reached: torch.jit's LLGA bridge in a torch built with oneDNN, and no compile of
    it has failed in this process."""
    return not _graph_failed and torch.backends.mkldnn.is_available() and hasattr(torch._C, "_jit_set_llga_enabled")


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
_graph_failed = False  # set by the first failed compile (``_give_up_graph``)
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
