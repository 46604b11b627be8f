"""The ``cpu`` target: subclasses of the SAM family's modules that put oneDNN's kernels in their hooks.

Each computes its reference class's function. The kernels are taken only for CPU inference (``kernels.compute_dtype``:
a CPU tensor, no autograd, float32 or native bf16, no tracing, compiling or export); everywhere else, training
included, the forward is the reference class's own ops. So an accelerated model trains, traces and runs on CUDA as
the plain one does.

- products and convolutions: oneDNN with GELU fused (``kernels``): every ``linear`` / ``dense`` / ``conv2d`` hook;
- TinyViT's stage 0 (MBConv, patch merging) in strips of rows that stay in cache (``strips``; option ``conv_strips``);
- TinyViT's windows cut (padding included) and merged back (padding dropped) by one copy each way (option
  ``window_copies``): bit for bit the padding and reshapes of the reference;
- TinyViT's window attention: one more path, ``graph`` (oneDNN Graph's fused attention), taken by ``auto`` on the
  14 x 14 windows (``attention.biased_attention``).
"""

from __future__ import annotations

import torch
from torch import nn

from samadapt.accel import attention, kernels, strips
from samadapt.models import common, mask_decoder, tiny_vit, tiny_vit_attention, transformer, vit


def _inference(module: nn.Module) -> bool:
    return not any(m.training for m in module.modules())


class Conv2dBN(tiny_vit.Conv2dBN):
    conv2d = staticmethod(kernels.conv2d)


class MBConv(tiny_vit.MBConv):
    conv_strips = True  # option: in strips of rows where ``strips.strips_apply``

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1.c.out_channels
        if self.conv_strips and strips.strips_apply(x, hidden) and _inference(self):
            return strips.mbconv(x, self.conv1.folded(), self.conv2.folded(), self.conv3.folded())
        return super().forward(x)


class PatchMerging(tiny_vit.PatchMerging):
    conv_strips = True

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_strips and strips.strips_apply(x, self.conv1.c.out_channels) and _inference(self):
            folded = self.conv1.folded(), self.conv2.folded(), self.conv3.folded()
            return strips.patch_merging(x, *folded, stride=self.conv2.c.stride[0])
        return super().convolve(x)


class Mlp(tiny_vit_attention.Mlp):
    linear = staticmethod(kernels.linear)


class WindowAttention(tiny_vit_attention.Attention):
    linear = staticmethod(kernels.linear)
    attention_paths = attention.ATTENTION_PATHS
    window_copies = True  # option: cut and merge the windows by copies for CPU inference

    def _by_copy(self, x: torch.Tensor) -> bool:
        return self.window_copies and kernels.compute_dtype(x) is not None

    def partition(self, qkv: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
        if self._by_copy(qkv):
            return attention.partition_windows(qkv, self.window_size, fill)
        return super().partition(qkv, fill)

    def merge(self, grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if self._by_copy(grid):
            return attention.merge_windows(grid, height, width).view(grid.shape[0], height, width, self.dh)
        return super().merge(grid, height, width)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return attention.biased_attention(q, k, v, bias, self.scale, self.attention_path)


class MLPBlock(common.MLPBlock):
    linear = staticmethod(kernels.linear)


class TwoWayAttention(transformer.Attention):
    linear = staticmethod(kernels.linear)


class ViTAttention(vit.Attention):
    linear = staticmethod(kernels.linear)


class MaskDecoder(mask_decoder.MaskDecoder):
    dense = staticmethod(kernels.dense)


FORMS: dict[type[nn.Module], type[nn.Module]] = {
    tiny_vit.Conv2dBN: Conv2dBN,
    tiny_vit.MBConv: MBConv,
    tiny_vit.PatchMerging: PatchMerging,
    tiny_vit_attention.Mlp: Mlp,
    tiny_vit_attention.Attention: WindowAttention,
    common.MLPBlock: MLPBlock,
    transformer.Attention: TwoWayAttention,
    vit.Attention: ViTAttention,
    mask_decoder.MaskDecoder: MaskDecoder,
}
