"""The ``onnx`` target: subclasses whose forward is the graph an ONNX export should trace, in standard ONNX ops.

Each computes its reference class's function, in forms that run faster on onnxruntime's CPU provider or that a
trace can take at all (``export.onnx`` applies them to the copy it exports; eager torch runs them too):

- TinyViT's stage 0 (MBConv, patch merging) in strips of rows, concatenated (``strips.graph``);
- TinyViT's window attention with one transpose each way (``WindowAttention.window_attention``);
- the ViT's relative-position bias built whole (the eager inference form writes it in chunks into one buffer: slice
  assignments, ScatterND in a graph);
- the mask decoder's upscaler as its layers (onnxruntime's own ConvTranspose is fast; eager torch takes a matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samadapt.accel import strips
from samadapt.models import mask_decoder, tiny_vit, tiny_vit_attention, vit
from samadapt.models.common import biased_attention, pad_to_windows


def _folded(block: nn.Module) -> tuple:
    return block.conv1.folded(), block.conv2.folded(), block.conv3.folded()


def _strips_pay(block: nn.Module, x: torch.Tensor) -> bool:
    return strips.large_hidden(x, block.conv1.c.out_channels, 4) and not any(m.training for m in block.modules())


class MBConv(tiny_vit.MBConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _strips_pay(self, x):
            return strips.graph(x, *_folded(self), stride=1, residual=True)
        return super().forward(x)


class PatchMerging(tiny_vit.PatchMerging):
    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        if _strips_pay(self, x):
            return strips.graph(x, *_folded(self), stride=self.conv2.c.stride[0], residual=False)
        return super().convolve(x)


class WindowAttention(tiny_vit_attention.Attention):
    def window_attention(self, qkv: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
        """The attention after ``qkv`` with one transpose each way: (B, H, W, P * heads) -> (B, H, W, C).

        The windows and their heads go to the batch axes in one transpose and q, k, v are split from it, already in
        the (windows, heads, N, d) layout of the products; the output comes back in one transpose too. The eager
        path's graph (partition, split, a transpose each for q, k and v, one for the heads' output, one to merge
        the windows) cost 5-14 ms more per LiteMedSAM encoder call on onnxruntime's CPU provider (one thread, AMD
        EPYC, five runs; e.g. 576 -> 562 ms). Padding is by concatenation (``common.pad_to_windows``: slice
        assignments become ScatterND over the whole grid).
        """
        B, H, W, P = qkv.shape
        w, heads = self.window_size, self.num_heads
        padded = pad_to_windows(qkv, w, fill)
        nh, nw = padded.shape[1] // w, padded.shape[2] // w
        windows = padded.view(B, nh, w, nw, w, heads, P // heads).permute(0, 1, 3, 5, 2, 4, 6)
        q, k, v = windows.reshape(B * nh * nw, heads, w * w, P // heads).split([self.key_dim, self.key_dim, self.d], -1)
        out = biased_attention(q, k, v, self.attention_bias()[None], self.scale, "explicit")  # (G, heads, N, d)
        out = out.view(B, nh, nw, heads, w, w, self.d).permute(0, 1, 4, 2, 5, 3, 6)  # (B, nh, w, nw, w, heads, d)
        return self.linear(out.reshape(B, nh * w, nw * w, self.dh)[:, :H, :W], self.proj)


class ViTAttention(vit.Attention):
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if torch.is_grad_enabled() and (q.requires_grad or self.rel_pos_h.requires_grad):
            return super().attend(q, k, v, grid)
        bias = vit.relative_position_bias(q, self.rel_pos_h, self.rel_pos_w, grid)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))


class MaskDecoder(mask_decoder.MaskDecoder):
    def _upscale(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_upscaling(x)


FORMS: dict[type[nn.Module], type[nn.Module]] = {
    tiny_vit.MBConv: MBConv,
    tiny_vit.PatchMerging: PatchMerging,
    tiny_vit_attention.Attention: WindowAttention,
    vit.Attention: ViTAttention,
    mask_decoder.MaskDecoder: MaskDecoder,
}
