"""Small building blocks shared by the SAM components, and the empty adapter slots."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gelu_fresh(x: torch.Tensor) -> torch.Tensor:
    """GELU of a tensor that was just made and is referenced nowhere else: in place when autograd does not track it.

    Writing into the tensor saves a fresh allocation, which on CPU costs more than the GELU itself for large
    activations (new pages are faulted in and zeroed). Same numbers as ``F.gelu``.
    """
    return torch.ops.aten.gelu_(x) if not x.requires_grad else F.gelu(x)


# The product hooks. Modules call their matrix products and convolutions through class attributes set to these
# plain forms (``linear``, ``dense``, ``conv2d``); ``samadapt.accel`` swaps in subclasses whose attributes name
# faster kernels of the same signature and function (oneDNN for CPU inference). The models never see which.


def linear(x: torch.Tensor, layer: nn.Module, gelu: bool = False) -> torch.Tensor:
    """``layer(x)`` (a ``nn.Linear``, or a layer that wraps one, such as LoRA's), then GELU if ``gelu``."""
    out = layer(x)
    return gelu_fresh(out) if gelu else out


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, then GELU if ``gelu``."""
    out = F.linear(x, weight, bias)
    return gelu_fresh(out) if gelu else out


def conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d, gelu: bool = False
) -> torch.Tensor:
    """``F.conv2d`` of ``weight`` and ``bias`` with ``conv``'s stride, padding, dilation and groups, then GELU if
    ``gelu``."""
    out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return gelu_fresh(out) if gelu else out


class MLPBlock(nn.Module):
    """Two-layer perceptron ``lin2(act(lin1(x)))`` (SAM's transformer MLP)."""

    linear = staticmethod(linear)  # the product hook (see ``linear``)

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.act) is nn.GELU and self.act.approximate == "none":  # a kernel may fuse it into the product
            return self.linear(self.linear(x, self.lin1, gelu=True), self.lin2)
        return self.linear(self.act(self.linear(x, self.lin1)), self.lin2)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the fused layer norm over the last axis of a channels-last view: the same function as the mean / variance
        # over axis 1 written out (biased variance, eps inside the root), one pass instead of eight strided ones
        # (70 -> 8 ms on the decoder's (1, 64, 128, 128), 2 loaded CPU cores); the result keeps channels-last strides
        normed = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return normed.permute(0, 3, 1, 2)


def pad_to_windows(x: torch.Tensor, window: int, value: torch.Tensor | None) -> torch.Tensor:
    """Pad (B, H, W, C) at the bottom / right up to multiples of ``window`` with the vector ``value`` (zeros when
    None).

    By concatenation: its backward hands out views of the gradient, where slice assignments would copy the whole
    padded gradient once per assignment (CopySlices); in an ONNX graph the assignments become ScatterND over the
    whole grid, where Concat is one copy.
    """
    B, H, W, C = x.shape
    pad_h, pad_w = -H % window, -W % window
    if not (pad_h or pad_w):
        return x
    fill = (value if value is not None else x.new_zeros(C)).to(x.dtype)
    if pad_w:
        x = torch.cat([x, fill.expand(B, H, pad_w, C)], dim=2)
    if pad_h:
        x = torch.cat([x, fill.expand(B, pad_h, W + pad_w, C)], dim=1)
    return x


ATTENTION_PATHS = ("auto", "fused", "explicit")


def biased_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, path: str = "auto"
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for (..., N, d) q, k, v and a broadcastable (..., N, N) additive bias.

    ``fused``: ``scaled_dot_product_attention``. ``explicit``: two batched matmuls and a softmax, all in q's dtype.
    (``samadapt.accel`` adds ``graph``, oneDNN Graph's fused attention for CPU inference.)

    ``auto``, on the CPU: ``explicit`` for a reduced-precision (bf16 / fp16) attention, as torch's fused CPU kernel
    is slow there, for the backward most (bf16, TinyViT's 49- and 196-token windows: 3-5x the explicit form's
    forward + backward, bench/attention_paths.py) and for inference too (LiteMedSAM's bf16 encoder: 325 vs 360 ms
    per slice, one thread, docs/performance.md), and ``fused`` in float32 (the explicit float32 form is slower: its
    matmuls, like the fused kernel's, go through MKL's sgemm, at half oneDNN's rate on the AMD EPYC of issue 14). On
    CUDA ``auto`` is ``fused``.

    The explicit form rounds the scores to q's dtype before the softmax (the fused kernel keeps them in float32): in
    bf16 about twice the fused kernel's error against float32 on one attention (~1 % vs ~0.5 % relative on outputs
    and gradients; on the whole bf16 encoder the same, 6.4 %, as the other bf16 roundings dominate), so ``fused``
    is the switch that keeps the fused numbers.
    """
    if path not in ATTENTION_PATHS:
        raise ValueError(f"unknown attention path {path!r}; choose one of {', '.join(ATTENTION_PATHS)}")
    if path == "auto":
        path = "explicit" if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) else "fused"
    if path == "fused":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return torch.softmax((q * scale) @ k.transpose(-1, -2) + bias, dim=-1) @ v


class IdentitySlot(nn.Identity):
    """An empty slot on a path: passes its first input through unchanged (extra inputs are ignored)."""

    def forward(self, x: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        return x


class ZeroSlot(nn.Module):
    """An empty slot for a parallel branch: contributes nothing to the sum it is added to."""

    def forward(self, x: torch.Tensor, *context: torch.Tensor) -> float:
        return 0.0


def is_empty_slot(module: nn.Module) -> bool:
    return isinstance(module, (IdentitySlot, ZeroSlot))


# The slot contract: the attributes every block offers to PEFT methods, with their empty default. A method fills
# a slot with a module of the same call signature; an empty slot leaves the base model's function unchanged.
ENCODER_BLOCK_SLOTS: dict[str, type[nn.Module]] = {
    "depth_branch": ZeroSlot,  # depth_branch(h) -> added to the attention output (MSA 3D)
    "attn_adapter": IdentitySlot,  # attn_adapter(a) -> replaces the attention output (MSA space adapter)
    "mlp_adapter": ZeroSlot,  # mlp_adapter(h) -> added beside the MLP (MSA parallel adapter)
}
DECODER_BLOCK_SLOTS: dict[str, type[nn.Module]] = {
    "token_to_image_adapter": IdentitySlot,  # (x, prompt) -> x after token-to-image attention (MSA, prompted)
    "mlp_adapter": ZeroSlot,  # beside the token MLP
    "image_to_token_adapter": IdentitySlot,  # on the image tokens after image-to-token attention
}

# The model-level slot of ``Sam``: text_prompt(text (P, E)) -> (P, T, C) prompt tokens, appended to the sparse ones.
MODEL_SLOTS: dict[str, type[nn.Module]] = {"text_prompt": IdentitySlot}


def has_slots(module: nn.Module, slots: dict[str, type[nn.Module]]) -> bool:
    return all(hasattr(module, name) for name in slots)


def frozen_prefix(stages: list[nn.Module], x: torch.Tensor) -> int:
    """How many leading ``stages`` need no autograd graph: none of their parameters trains and ``x`` needs no
    gradient (0 when autograd is off anyway)."""
    if not torch.is_grad_enabled() or x.requires_grad:
        return 0
    count = 0
    for stage in stages:
        if any(p.requires_grad for p in stage.parameters()):
            break
        count += 1
    return count
