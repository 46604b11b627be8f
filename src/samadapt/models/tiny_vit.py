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
with the learned biases as its additive mask (the explicit form in bf16 on the CPU, where the fused kernel is slow:
``common.biased_attention``, switch ``TinyViT.set_attention_path``), convolutions in channels-last layout, batch
norm folded into the convolution in eval mode, and no ``norm`` / ``qkv`` / ``proj`` work on window padding
(bench/tiny_vit_forward.py).

These are plain torch modules. The deployment forms of the same function (oneDNN's fused kernels, stage 0 in
strips of rows, window copies, oneDNN Graph attention for CPU inference; the graph forms an ONNX export traces) are
subclasses that ``samadapt.accel.accelerate`` swaps in from outside. The modules offer them their hooks: the product
hooks ``linear`` / ``conv2d`` (``common.linear``, ``common.conv2d``), ``PatchMerging.convolve`` and
``Attention.partition`` / ``merge`` / ``attend`` / ``window_attention``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from samadapt.models import common
from samadapt.models.common import IdentitySlot, LayerNorm2d, ZeroSlot, frozen_prefix, gelu_fresh
from samadapt.models.tiny_vit_attention import Attention, Mlp

__all__ = ["Attention", "Conv2dBN", "MBConv", "Mlp", "PatchMerging", "TinyViT", "TinyViTBlock", "tiny_vit_5m"]

Folded = tuple[torch.Tensor, torch.Tensor]  # a convolution's (weight, bias) with its batch norm folded in


def drop_path(x: torch.Tensor, prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch for a random subset of samples (axis 0), rescale the rest."""
    if prob == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - prob)
    return x * keep / (1.0 - prob)


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
    of two, and gradients still reach ``c`` and ``bn`` through the fold. ``gelu``: a GELU follows (a kernel may fuse
    it into the convolution: the hook ``conv2d``).
    """

    conv2d = staticmethod(common.conv2d)  # the convolution hook of eval mode (``common.conv2d``)

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
        return self.conv2d(x, *self.folded(), self.c, gelu)

    def folded(self) -> Folded:
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
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual add, GELU. (B, C, H, W) -> same."""

    def __init__(self, dim: int, expand_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim, bn_init=0.0)  # zero-init: each block starts as the identity
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.conv2(self.conv1(x, gelu=True), gelu=True))
        return gelu_fresh(add_fresh(x, drop_path(out, self.drop_path, self.training)))


class PatchMerging(nn.Module):
    """1x1 conv, 3x3 depthwise conv of ``stride``, 1x1 conv (GELU between), to tokens.

    Input (B, C, H, W), or tokens (B, H * W, C) on the ``resolution`` (H, W) grid; output (B, H' * W', out_dim)
    with H' = H / stride. Token grids are handed to the convolutions (``convolve``) as channels-last views (no copy).
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
        x = self.convolve(x)
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        """The three convolutions: (B, C, H, W) -> (B, out_dim, H', W')."""
        return self.conv3(self.conv2(self.conv1(x, gelu=True), gelu=True))


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
        """``auto`` (default), ``fused`` or ``explicit`` for every window attention (``common.biased_attention``;
        an accelerated encoder, ``samadapt.accel``, also takes ``graph``)."""
        attentions = [module for module in self.modules() if isinstance(module, Attention)]
        for module in attentions:
            if path not in module.attention_paths:
                paths = ", ".join(module.attention_paths)
                raise ValueError(f"unknown attention path {path!r}; choose one of {paths}")
        for module in attentions:
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
