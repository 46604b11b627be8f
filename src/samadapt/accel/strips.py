"""TinyViT's stage 0 (MBConv, patch merging) in strips of rows: one strip convolution, two sets of ops.

An inverted-residual block expands its input 4x; at LiteMedSAM's stage 0 (256 x 256 x 64 in float32) its hidden
activations are 32 and 64 MiB per image. Computed for a few rows of output at a time, each strip's hidden rows go
through all three convolutions while they are in cache and are never allocated whole. Output row r of the 3x3
depthwise convolution (padding 1, ``stride``) reads hidden rows stride * r - 1 to stride * r + 1, so a strip's hidden
rows overlap its neighbours' by a row or two: recomputed (a 16-row strip costs 2 / 16 more expansion; stitching the
neighbours' rows in was slower). ``_strip`` owns that arithmetic (and the image border's) for both sets of ops:

- ``OneDNN``: CPU inference in torch (``accel.cpu``), oneDNN's fused convolution + GELU, the residual added as the
  projection's post-op, each image's strips written into one channels-last output (float32 and bf16). Most of what
  this saved on the EPYC of issue 14 was the page faults of the fresh 32 and 64 MiB buffers the whole blocks ask for
  on every call: with glibc told to keep freed memory (MALLOC_MMAP_MAX_=0 and a large MALLOC_TRIM_THRESHOLD_) the
  whole blocks ran as fast.
- ``Graph``: the form an ONNX export traces (``accel.onnx_forms``), standard ONNX ops only, strips concatenated, the
  batch axis kept whole (it stays dynamic in the graph). The convolutions gain on onnxruntime (their outputs stay in
  cache); its GELUs, compute-bound, do not.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from samadapt.accel import kernels
from samadapt.models.tiny_vit import Folded

# hidden activation per strip: 16 rows of LiteMedSAM's 256 x 256 x 256 stage 0 in float32, 32 in bf16. Best of 1 to
# 8 MiB (one thread, AMD EPYC with 1 MiB of L2 per core and 32 MiB of L3): smaller strips recompute more halo rows
# and pay more per-call overhead, larger ones fall out of cache. The ONNX export's strips measured best at the same
# size on onnxruntime: 4, 8, 16, 32 rows -> 557, 544 / 562, 541 / 552, 548 ms per encoder call, whole blocks
# 565 / 579 (one thread, two runs).
STRIP_BYTES = 4 * 2**20
# blocks whose hidden activation (one image) is at most this run whole: strips were slower there (LiteMedSAM's later
# patch mergings, 10 and 5 MiB in float32: 5.4 -> 5.7 and 6.0 -> 6.5 ms, one thread); its stage 0 has 32 and 64 MiB
WHOLE_BYTES = 16 * 2**20


def large_hidden(x: torch.Tensor, hidden: int, itemsize: int) -> bool:
    """Whether a block expanding (B, C, H, W) ``x`` to ``hidden`` channels of ``itemsize`` bytes should run in strips:
    its hidden activation (one image) is over ``WHOLE_BYTES``."""
    return x.shape[2] * x.shape[3] * hidden * itemsize > WHOLE_BYTES


def strip_rows(width: int, hidden: int, itemsize: int, stride: int) -> int:
    """Output rows per strip: ``STRIP_BYTES`` of hidden activation (``hidden`` channels of ``itemsize`` bytes, on
    input rows ``width`` wide, ``stride`` of them per output row), at least one."""
    return max(1, STRIP_BYTES // (width * hidden * itemsize * stride))


class OneDNN:
    """oneDNN's fused ops in ``dtype`` (``kernels.compute_dtype``), one image at a time."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def images(self, batch: int) -> list[slice]:
        return [slice(image, image + 1) for image in range(batch)]

    def conv(self, x, weight, bias, padding: tuple[int, int], stride: int, groups: int, gelu: bool) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(weight.dtype), weight, bias, list(padding), [stride, stride], [1, 1], groups, *kernels.gelu_args(gelu)
        )

    def project_add_gelu(self, hidden: torch.Tensor, shortcut: torch.Tensor, project: Folded) -> torch.Tensor:
        """GELU(shortcut + project(hidden)) in ``shortcut``'s dtype."""
        if hidden.dtype == shortcut.dtype:  # the residual added by oneDNN as the projection's post-op
            out = torch.ops.mkldnn._convolution_pointwise.binary(
                hidden, shortcut, *project, [0, 0], [1, 1], [1, 1], 1, "add", 1.0, None, [], ""
            )
        else:  # bf16 autocast on a float32 input: added in float32, as the whole block adds its bf16 branch
            out = shortcut + self.conv(hidden, *project, padding=(0, 0), stride=1, groups=1, gelu=False)
        # oneDNN takes no GELU after the residual add; as the post-op of an identity (1x1, one weight per channel)
        # convolution it costs a third of aten's gelu_ on this strip
        identity = out.new_ones(out.shape[1], 1, 1, 1)
        return self.conv(out, identity, None, padding=(0, 0), stride=1, groups=out.shape[1], gelu=True)


class Graph:
    """Plain ``F.conv2d`` / ``F.gelu`` (standard ONNX ops) in float32, the whole batch at once."""

    dtype = torch.float32

    def images(self, batch: int) -> list[slice]:
        return [slice(None)]

    def conv(self, x, weight, bias, padding: tuple[int, int], stride: int, groups: int, gelu: bool) -> torch.Tensor:
        out = F.conv2d(x, weight, bias, stride=stride, padding=padding, groups=groups)
        return F.gelu(out) if gelu else out

    def project_add_gelu(self, hidden: torch.Tensor, shortcut: torch.Tensor, project: Folded) -> torch.Tensor:
        return F.gelu(shortcut + F.conv2d(hidden, *project))


def strips(
    x: torch.Tensor, expand: Folded, depthwise: Folded, project: Folded, stride: int, residual: bool, ops
) -> Iterator[tuple[slice, int, int, torch.Tensor]]:
    """(images, top, bottom, output rows [top, bottom) of those images) for every strip of (B, C, H, W) ``x``, top to
    bottom: GELU(x + project(GELU(depthwise(GELU(expand(x)))))) with ``residual`` (MBConv), else
    project(GELU(depthwise(GELU(expand(x))))) (patch merging). 1x1 ``expand`` (C -> hidden) and ``project``, a 3x3
    depthwise convolution of ``stride`` and padding 1, each (weight, bias) in ``ops.dtype``."""
    batch, _, height, width = x.shape
    out_height = (height - 1) // stride + 1  # 3x3, padding 1
    rows = strip_rows(width, expand[0].shape[0], ops.dtype.itemsize, stride)
    for images in ops.images(batch):
        for top in range(0, out_height, rows):
            bottom = min(top + rows, out_height)
            yield images, top, bottom, _strip(x[images], top, bottom, expand, depthwise, project, stride, residual, ops)


def _strip(x, top: int, bottom: int, expand, depthwise, project, stride: int, residual: bool, ops) -> torch.Tensor:
    """Output rows [top, bottom) of ``strips`` for images ``x`` (b, C, H, W)."""
    height = x.shape[2]
    low, high = stride * top - 1, stride * (bottom - 1) + 2  # the hidden rows these output rows read
    if low >= 0 and high <= height:  # inside the image: exactly those rows, no vertical padding
        pad, skip = (0, 1), 0
    else:
        # at the image border the convolution's zero padding stands for the missing rows (the padding of the hidden
        # activation: GELU(expand(0)) is not 0). The strip then starts one output row early, on an input row that
        # is a multiple of stride, so that its rows line up with the whole image's; that extra row reads the
        # padding and is dropped (oneDNN pads both sides alike).
        low, high, pad = stride * max(top - 1, 0), min(high, height), (1, 1)
        skip = top - low // stride
    hidden = ops.conv(x[:, :, low:high], *expand, padding=(0, 0), stride=1, groups=1, gelu=True)
    hidden = ops.conv(hidden, *depthwise, padding=pad, stride=stride, groups=hidden.shape[1], gelu=True)
    if hidden.shape[2] != bottom - top:
        hidden = hidden[:, :, skip : skip + bottom - top]
    if not residual:
        return ops.conv(hidden, *project, padding=(0, 0), stride=1, groups=1, gelu=False)
    return ops.project_add_gelu(hidden, x[:, :, top:bottom], project)


def strips_apply(x: torch.Tensor, hidden: int) -> bool:
    """Whether ``mbconv`` and ``patch_merging`` with ``hidden`` channels after the expansion should run on ``x``: a
    channels-last (B, C, H, W) tensor (its strips of rows are then contiguous), for inference where the fused kernels
    may (``kernels.compute_dtype``: float32 or bf16), a hidden activation over ``WHOLE_BYTES`` per image."""
    dtype = kernels.compute_dtype(x)
    return (
        dtype is not None
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and large_hidden(x, hidden, dtype.itemsize)
        and hasattr(torch.ops.mkldnn._convolution_pointwise, "binary")
    )


def mbconv(x: torch.Tensor, expand: Folded, depthwise: Folded, project: Folded) -> torch.Tensor:
    """GELU(x + project(GELU(depthwise(GELU(expand(x)))))) on channels-last (B, C, H, W) ``x`` by oneDNN, in strips.

    The same function as the three convolutions run whole; they compute in ``kernels.compute_dtype(x)`` (bf16 under
    autocast), the residual add and the last GELU in ``x``'s dtype, as the whole block does. Call only where
    ``strips_apply``.
    """
    return _onednn(x, expand, depthwise, project, stride=1, residual=True)


def patch_merging(x: torch.Tensor, expand: Folded, depthwise: Folded, project: Folded, stride: int) -> torch.Tensor:
    """project(GELU(depthwise(GELU(expand(x))))) on channels-last (B, C, H, W) ``x`` -> (B, C', H', W'), channels-last,
    in ``kernels.compute_dtype(x)``, by oneDNN in strips. Call only where ``strips_apply``."""
    return _onednn(x, expand, depthwise, project, stride, residual=False)


def _onednn(x, expand: Folded, depthwise: Folded, project: Folded, stride: int, residual: bool) -> torch.Tensor:
    dtype = kernels.compute_dtype(x)
    expand, depthwise, project = ((w.to(dtype), b.to(dtype)) for w, b in (expand, depthwise, project))
    batch, _, height, width = x.shape
    shape = (batch, project[0].shape[0], (height - 1) // stride + 1, (width - 1) // stride + 1)
    out = torch.empty(shape, dtype=x.dtype if residual else dtype, device=x.device, memory_format=torch.channels_last)
    for images, top, bottom, strip in strips(x, expand, depthwise, project, stride, residual, OneDNN(dtype)):
        out[images, :, top:bottom].copy_(strip)  # at once: the strip's memory is reused, warm, by the next one
    return out


def graph(x: torch.Tensor, expand: Folded, depthwise: Folded, project: Folded, stride: int, residual: bool):
    """``mbconv`` (``residual``) or ``patch_merging`` as a graph of strips of output rows, concatenated: (B, C, H, W)
    -> (B, C', H', W'), every op a plain ONNX one, float32."""
    return torch.cat([strip for *_, strip in strips(x, expand, depthwise, project, stride, residual, Graph())], dim=2)
