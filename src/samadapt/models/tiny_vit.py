"""TinyViT image encoder in LiteMedSAM's variant, with the same empty adapter slots as our ViT.

LiteMedSAM replaces TinyViT's stride-4 patch embedding by two 1x1 convolutions, so the convolutional first stage runs
at the input resolution and the two stride-2 patch mergings bring a 256 input down to the 64 x 64 grid SAM's decoder
expects. Parameter names and shapes follow the checkpoint ``lite_medsam.pth``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from samadapt.models.common import IdentitySlot, LayerNorm2d, ZeroSlot


class Conv2dBN(nn.Sequential):
    """Convolution without bias followed by batch norm (keys ``c`` and ``bn``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, pad: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn.training:
            return self.bn(self.c(x))
        # eval: fold the batch norm into the convolution (one pass over the activations instead of two)
        scale = self.bn.weight * torch.rsqrt(self.bn.running_var + self.bn.eps)
        weight = self.c.weight * scale[:, None, None, None]
        bias = self.bn.bias - self.bn.running_mean * scale
        return F.conv2d(x, weight, bias, self.c.stride, self.c.padding, self.c.dilation, self.c.groups)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(in_chans, embed_dim // 2), nn.GELU(), Conv2dBN(embed_dim // 2, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU. (B, C, H, W) -> same."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return self.act(out + x)


class PatchMerging(nn.Module):
    """(B, C, H, W) or (B, H*W, C) -> (B, H'*W', C_out); stride 2, or 1 for the last stage (TinyViT-SAM)."""

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        stride = 1 if out_dim in (320, 448, 576) else 2
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.transpose(1, 2).unflatten(2, self.resolution)
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


class ConvLayer(nn.Module):
    def __init__(self, dim: int, resolution, depth: int, out_dim: int, expand_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(resolution, dim, out_dim)
        self.use_checkpoint = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = (
                checkpoint(block, x, use_reentrant=False)
                if self.use_checkpoint and torch.is_grad_enabled()
                else block(x)
            )
        return self.downsample(x)


class Mlp(nn.Module):
    """norm -> fc1 -> GELU -> fc2; ``forward_normed`` skips the norm (the block computes it once for its slot)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward_normed(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_normed(self.norm(x))


class Attention(nn.Module):
    """Window attention with learned per-offset biases, on (B, N, C) tokens of a ``resolution`` window.

    ``qkv`` output is laid out PER HEAD: for head h, rows [q_h (key_dim) | k_h (key_dim) | v_h (d)]; see
    ``qkv_slices``. The attention applies its own LayerNorm (``norm``) first.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, resolution: tuple[int, int]):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.attn_ratio = attn_ratio
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, self.dh + 2 * key_dim * num_heads)
        self.proj = nn.Linear(self.dh, dim)
        points = list(itertools.product(range(resolution[0]), range(resolution[1])))
        offsets: dict[tuple[int, int], int] = {}
        index = [offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets)) for a in points for b in points]
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer(
            "attention_bias_idxs", torch.tensor(index).view(len(points), len(points)), persistent=False
        )

    def qkv_slices(self) -> dict[str, list[slice]]:
        """Output rows of ``qkv`` holding q, k and v, head by head (LoRA and the depth branch use them)."""
        per_head = 2 * self.key_dim + self.d
        starts = [h * per_head for h in range(self.num_heads)]
        return {
            "q": [slice(s, s + self.key_dim) for s in starts],
            "k": [slice(s + self.key_dim, s + 2 * self.key_dim) for s in starts],
            "v": [slice(s + 2 * self.key_dim, s + per_head) for s in starts],
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(B, N, self.num_heads, -1)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([self.key_dim, self.key_dim, self.d], dim=3))
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # (heads, N, N)
        if torch.is_grad_enabled() and (q.requires_grad or bias.requires_grad):
            # windows are small: explicit attention trains faster than fused kernels (see vit.py)
            out = ((q * self.key_dim**-0.5) @ k.transpose(-2, -1) + bias).softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(B, N, self.dh))


class TinyViTBlock(nn.Module):
    """Window attention, depthwise local conv, MLP on (B, H*W, C) tokens, with adapter slots (docs/architecture.md)."""

    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window_size: int, mlp_ratio: float):
        super().__init__()
        self.resolution = resolution
        self.window_size = window_size
        self.attn = Attention(dim, dim // num_heads, num_heads, 1.0, (window_size, window_size))
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, 3, 1, 1, groups=dim)
        self.depth_branch: nn.Module = ZeroSlot()
        self.attn_adapter: nn.Module = IdentitySlot()
        self.mlp_adapter: nn.Module = ZeroSlot()

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.resolution
        B, L, C = x.shape
        w = self.window_size
        if H == w and W == w:
            return self.attn(x)
        pad_b, pad_r = (w - H % w) % w, (w - W % w) % w
        grid = F.pad(x.view(B, H, W, C), (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        windows = grid.view(B, Hp // w, w, Wp // w, w, C).transpose(2, 3).reshape(-1, w * w, C)
        out = self.attn(windows).view(B, Hp // w, Wp // w, w, w, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        return out[:, :H, :W].reshape(B, L, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.resolution
        B, L, C = x.shape
        a = self._window_attention(x) + self.depth_branch(x)
        x = x + self.attn_adapter(a)
        x = self.local_conv(x.transpose(1, 2).reshape(B, C, H, W)).view(B, C, L).transpose(1, 2)
        m = self.mlp.norm(x)
        return x + self.mlp.forward_normed(m) + self.mlp_adapter(m)


class BasicLayer(nn.Module):
    def __init__(self, dim, resolution, depth, num_heads, window_size, mlp_ratio, out_dim: int | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, resolution, num_heads, window_size, mlp_ratio) for _ in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim, out_dim) if out_dim is not None else None
        self.use_checkpoint = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = (
                checkpoint(block, x, use_reentrant=False)
                if self.use_checkpoint and torch.is_grad_enabled()
                else block(x)
            )
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """TinyViT-SAM encoder: (B, 3, img_size, img_size) -> (B, 256, img_size / 4, img_size / 4) for LiteMedSAM."""

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.layers = nn.ModuleList()
        for i, dim in enumerate(embed_dims):
            side = img_size // 2 ** (i - 1 if i == 3 else i)
            resolution = (side, side)
            out_dim = embed_dims[min(i + 1, len(embed_dims) - 1)] if i < len(embed_dims) - 1 else None
            if i == 0:
                self.layers.append(ConvLayer(dim, resolution, depths[i], out_dim, mbconv_expand_ratio))
            else:
                layer = BasicLayer(dim, resolution, depths[i], num_heads[i], window_sizes[i], mlp_ratio, out_dim)
                self.layers.append(layer)
        self.grid = img_size // 2 ** (len(embed_dims) - 2)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], 256, kernel_size=1, bias=False),
            LayerNorm2d(256),
            nn.Conv2d(256, 256, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(256),
        )

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        for layer in self.layers:
            layer.use_checkpoint = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        B, _, C = x.shape
        return self.neck(x.view(B, self.grid, self.grid, C).permute(0, 3, 1, 2))


def tiny_vit_5m(img_size: int = 256) -> TinyViT:
    """LiteMedSAM's encoder (5.7 M parameters)."""
    return TinyViT(img_size=img_size)
