"""SAM's mask decoder (two-way transformer + hypernetwork heads), and its semantic (SAMed) form.

State-dict keys and shapes are those of ``segment_anything.modeling.MaskDecoder``.

Prompted (SAM): ``num_multimask_outputs`` + 1 mask tokens. ``multimask_output=False`` returns token 0's mask,
``multimask_output=True`` tokens 1.. (three in SAM), exactly as the reference.

Semantic (SAMed): ``num_multimask_outputs = num_classes`` and ``semantic=True``, so there are num_classes + 1 mask
tokens, one per class with background first, and every call returns ALL of them, (B, num_classes + 1, 4h, 4w) logits
for an argmax over classes, whatever ``multimask_output`` says. ``make_semantic_decoder`` (in place) and
``build_semantic_decoder`` (a new decoder) make one from a pre-trained prompted decoder; ``resize_mask_token_state``
does the same on a state dict (e.g. a checkpoint file's ``mask_decoder.*`` tensors). Each reports exactly which
tensors were resized, added or removed, and logs it: nothing is dropped silently.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from samadapt.models import common
from samadapt.models.common import LayerNorm2d

log = logging.getLogger(__name__)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (no activation after the last); optional sigmoid."""

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, sigmoid_output: bool = False
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        widths_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        widths_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths_in, widths_out, strict=True))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., input_dim) -> (..., output_dim)."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == last else F.relu(layer(x))
        return torch.sigmoid(x) if self.sigmoid_output else x


class MaskDecoder(nn.Module):
    """Predict mask logits and their IoU from image and prompt embeddings.

    Args:
        transformer_dim: token width C (256).
        transformer: the two-way transformer, ``(image (B, C, h, w), pe (B, C, h, w), tokens (B, T, C)) ->
            (tokens (B, T, C), image tokens (B, h*w, C))``.
        num_multimask_outputs: masks of the multimask output (SAM: 3); semantic: the number of classes.
        activation: activation class of the upscaler.
        iou_head_depth: layers of the IoU head (3).
        iou_head_hidden_dim: hidden width of the IoU head (256).
        semantic: return all ``num_multimask_outputs + 1`` masks on every call (SAMed; channel 0 = background).

    The outputs are low-res logits at 4x the image-embedding size: (B, K, 4h, 4w) (256 x 256 for a 64 x 64
    embedding), and IoU predictions (B, K).
    """

    dense = staticmethod(common.dense)  # the product hook of the upscaler's matrix products (``common.dense``)

    def __init__(
        self,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        semantic: bool = False,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.semantic = semantic
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)
        # semantic decoders only (``make_semantic_decoder``): a map of where each image token lies, added to it
        self.position_prior: nn.Module | None = None
        # opt-in (``make_semantic_decoder(slice_position=True)``): where the slice lies along its volume's axis
        self.slice_prior: nn.Module | None = None

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        slice_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks.

        Args:
            image_embeddings: (B, C, h, w), or (1, C, h, w) shared by the B prompt sets.
            image_pe: (1, C, h, w) positional encoding (``PromptEncoder.get_dense_pe()``).
            sparse_prompt_embeddings: (B, T, C) point / box tokens (T may be 0).
            dense_prompt_embeddings: (B, C, h, w) mask-prompt or "no mask" embedding.
            multimask_output: prompted mode: masks of tokens 1.. instead of token 0's. Ignored in semantic mode.
            slice_position: (B,) or (1,) positions in [0, 1] of the slices along their volume's axis
                (``data.position.slice_position``); required by, and only accepted by, a decoder with a
                ``slice_prior``.

        Raises:
            ValueError: a position given to a decoder without a slice prior, or missing for one with it.

        Returns:
            mask logits (B, K, 4h, 4w) and IoU predictions (B, K): K = 1, num_multimask_outputs, or (semantic)
            num_multimask_outputs + 1.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, slice_position
        )
        if self.semantic:
            return masks, iou_pred
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou_pred[:, keep]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        slice_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every mask token's logits (B, num_mask_tokens, 4h, 4w) and IoU predictions (B, num_mask_tokens)."""
        # checked first: a model fed without (or with an unexpected) position must fail, never guess (issue 18)
        if self.slice_prior is not None and slice_position is None:
            raise ValueError(
                "this decoder was trained with model.slice_position: give each slice's position along its axis"
            )
        if self.slice_prior is None and slice_position is not None:
            raise ValueError("a slice position was given to a decoder without model.slice_position")
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)
        if image_embeddings.shape[0] != batch:
            if image_embeddings.shape[0] != 1:
                raise ValueError(
                    f"{image_embeddings.shape[0]} image embeddings for {batch} prompt sets: give one per prompt set "
                    "or one shared embedding"
                )
            image_embeddings = image_embeddings.expand(batch, -1, -1, -1)
        src = image_embeddings + dense_prompt_embeddings
        if self.position_prior is not None:
            src = src + self.position_prior(image_pe)
        if self.slice_prior is not None:
            src = src + self.slice_prior(slice_position.to(src.device, src.dtype).reshape(-1))
        pos_src = image_pe.expand(src.shape[0], -1, -1, -1)
        b, c, h, w = src.shape

        tokens_out, image_tokens = self.transformer(src, pos_src, tokens)
        iou_token_out = tokens_out[:, 0]
        mask_tokens_out = tokens_out[:, 1 : 1 + self.num_mask_tokens]

        # (B, h, w, C) is a view of the image tokens: the upscaler runs channels-last without a copy
        upscaled = self._upscale(image_tokens.reshape(b, h, w, c).permute(0, 3, 1, 2))  # (B, C/8, 4h, 4w)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (B, num_mask_tokens, C/8)
        # (B, 4h * 4w, C/8) @ (B, C/8, K): reads the channels-last upscaled map as it lies
        pixels = upscaled.permute(0, 2, 3, 1).reshape(b, -1, upscaled.shape[1])
        masks = (pixels @ hyper_in.transpose(1, 2)).transpose(1, 2).reshape(b, -1, *upscaled.shape[-2:])
        return masks, self.iou_prediction_head(iou_token_out)

    def _upscale(self, x: torch.Tensor) -> torch.Tensor:
        """``output_upscaling`` applied to (B, C, h, w), its stride-2 transposed convolutions as matrix products."""
        for layer in self.output_upscaling:
            x = _conv_transpose_as_matmul(x, layer, self.dense) if _is_block_conv_transpose(layer) else layer(x)
        return x


def _is_block_conv_transpose(layer: nn.Module) -> bool:
    """A plain ConvTranspose2d whose kernel equals its stride (no padding, dilation or groups): every input pixel
    paints its own kernel-sized output block, so the layer is one matrix product and a pixel shuffle."""
    return (
        type(layer) is nn.ConvTranspose2d
        and layer.kernel_size == layer.stride
        and layer.padding == (0, 0)
        and layer.output_padding == (0, 0)
        and layer.dilation == (1, 1)
        and layer.groups == 1
    )


def _conv_transpose_as_matmul(x: torch.Tensor, layer: nn.ConvTranspose2d, dense=common.dense) -> torch.Tensor:
    """``layer(x)`` for a block transposed convolution (``_is_block_conv_transpose``), (B, C, h, w) ->
    (B, C', kh * h, kw * w) with channels-last strides: the same sums as the convolution, as one (B h w, C) @
    (C, C' kh kw) product (torch's CPU transposed convolution and its layout copies took ~1.7x longer on the
    decoder's first one; docs/performance.md, issue 14). ``dense``: the product (``common.dense``'s signature)."""
    b, c, h, w = x.shape
    kh, kw = layer.kernel_size
    out = layer.out_channels
    # rows ordered (kh, kw, C'): the pixel shuffle below then moves whole C'-long runs (ordered (C', kh, kw), it
    # gathered every 4th float: 5.7 of the decoder's ~30 ms, one thread)
    weight = layer.weight.permute(0, 2, 3, 1).reshape(c, kh * kw * out).t()
    bias = layer.bias.repeat(kh * kw) if layer.bias is not None else None
    y = dense(x.permute(0, 2, 3, 1).reshape(-1, c), weight, bias)
    y = y.reshape(b, h, w, kh, kw, out).permute(0, 1, 3, 2, 4, 5).reshape(b, h * kh, w * kw, out)
    return y.permute(0, 3, 1, 2)


# -- semantic (SAMed) decoders from pre-trained prompted ones ---------------------------------------------------------

_HYPER = re.compile(r"^output_hypernetworks_mlps\.(\d+)\.(.+)$")
_IOU_LAYER = re.compile(r"^iou_prediction_head\.layers\.(\d+)\.(weight|bias)$")


def token_sources(old_tokens: int, new_tokens: int) -> list[int]:
    """Which pre-trained mask token initialises each new one: background (token 0) copies token 0, class token i >= 1
    copies multimask token ``1 + (i - 1) mod (old_tokens - 1)`` (token 0 when there is no multimask token).

    With SAM's 4 tokens and K + 1 outputs: background from the single-mask token, classes 1, 2, 3, 4, 5, ... from the
    multimask tokens 1, 2, 3, 1, 2, ...: every class starts from a working SAM mask head (SAMed re-initialised these
    heads at random, dropping the pre-trained ones). Classes never start from the single-mask token: without a prompt
    it answers "nothing" with logits near -20 on LiteMedSAM, a class that starts there is saturated under the softmax
    and was never learnt (issue 18).
    """
    if old_tokens < 1 or new_tokens < 1:
        raise ValueError(f"token counts must be positive, got {old_tokens} -> {new_tokens}")
    if old_tokens == 1:
        return [0] * new_tokens
    return [0] + [1 + (i - 1) % (old_tokens - 1) for i in range(1, new_tokens)]


def resize_mask_token_state(
    state: Mapping[str, torch.Tensor], num_mask_tokens: int, prefix: str = "", zero_background: bool = True
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A prompted decoder's state dict, made to fit a decoder with ``num_mask_tokens`` mask tokens.

    Copies every tensor; for the per-token ones (``mask_tokens.weight``, the rows of the IoU head's last layer,
    the ``output_hypernetworks_mlps.<i>`` heads) new token i takes pre-trained token ``token_sources(...)[i]``.
    With ``zero_background`` (the default) the last layer of the background head (``output_hypernetworks_mlps.0``)
    starts at zero, so the background logit starts at 0 everywhere and class c wins a pixel exactly where its SAM
    head's logit is positive (SAM's own threshold): the softmax starts unsaturated. The copied single-mask head
    answers "nothing" without a prompt (logits near -20 on LiteMedSAM), which made every class win everywhere, an
    initial cross-entropy near 20 and a first few steps that drove the model onto the all-background plateau
    (issue 18). The zeroing is logged.

    Args:
        state: a state dict holding the decoder's tensors under ``prefix`` (other keys pass through unchanged).
        num_mask_tokens: the target token count (num_classes + 1 for a semantic decoder).
        prefix: where the decoder sits, e.g. ``"mask_decoder."`` in a whole-SAM checkpoint.

    Returns:
        the new state dict, and the exact names (with prefix) of the tensors whose shape changed, that were added
        or that were removed, in that order; the same is logged at INFO.
    """
    token_key = prefix + "mask_tokens.weight"
    if token_key not in state:
        raise KeyError(f"{token_key} is not in the state dict: not a mask decoder under prefix {prefix!r}")
    old = state[token_key].shape[0]
    sources = token_sources(old, num_mask_tokens)
    local = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    iou_layers = [int(m.group(1)) for k in local if (m := _IOU_LAYER.match(k))]
    if not iou_layers:
        raise KeyError(f"no {prefix}iou_prediction_head.layers.* tensors in the state dict")
    last_iou = max(iou_layers)

    resized_local: dict[str, torch.Tensor] = {"mask_tokens.weight": local["mask_tokens.weight"][sources].clone()}
    for kind in ("weight", "bias"):
        key = f"iou_prediction_head.layers.{last_iou}.{kind}"
        resized_local[key] = local[key][sources].clone()
    heads: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in local.items():
        if m := _HYPER.match(key):
            heads.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if sorted(heads) != list(range(old)):
        raise KeyError(f"expected hypernetwork heads 0..{old - 1} under {prefix!r}, found {sorted(heads)}")
    for i, source in enumerate(sources):
        for suffix, value in heads[source].items():
            resized_local[f"output_hypernetworks_mlps.{i}.{suffix}"] = value.clone()
    zeroed = []
    if zero_background:
        last_layer = max(int(k.split(".")[1]) for k in heads[0] if k.startswith("layers."))
        for kind in ("weight", "bias"):
            key = f"output_hypernetworks_mlps.0.layers.{last_layer}.{kind}"
            resized_local[key] = torch.zeros_like(resized_local[key])
            zeroed.append(prefix + key)

    per_token = {
        "mask_tokens.weight",
        *(f"iou_prediction_head.layers.{last_iou}.{kind}" for kind in ("weight", "bias")),
    }
    per_token |= {k for k in local if _HYPER.match(k)}
    new_state = {k: v for k, v in state.items() if not (k.startswith(prefix) and k[len(prefix) :] in per_token)}
    new_state.update({prefix + k: v for k, v in resized_local.items()})

    resized = [k for k in new_state if k in state and new_state[k].shape != state[k].shape]
    added = [k for k in new_state if k not in state]
    removed = [k for k in state if k not in new_state]
    if resized or added or removed or zeroed:
        log.info(
            "mask decoder %d -> %d mask tokens (token i copies pre-trained token %s): resized %s; added %s; removed %s; "
            "background head set to zero %s",
            old,
            num_mask_tokens,
            sources,
            resized or "none",
            added or "none",
            removed or "none",
            zeroed or "none",
        )
    return new_state, resized + added + removed


def make_semantic_decoder(
    decoder: MaskDecoder, num_classes: int, position_prior: bool = True, slice_position: bool = False
) -> list[str]:
    """Turn a (pre-trained) prompted decoder into a semantic decoder with ``num_classes`` + 1 outputs, in place.

    Every weight is kept; the mask tokens, hypernetwork heads and IoU-head outputs become num_classes + 1, new
    token i a copy of a pre-trained token (``token_sources``: background from token 0, classes from the multimask
    tokens), and the background head's last layer starts at zero (``resize_mask_token_state``): channel 0 is 0
    everywhere at first. With num_classes = 3 channels 1..3 are exactly the pre-trained multimask masks; with more
    classes the extra tokens also join the transformer's self-attention, so the copies start close to, not equal to,
    them.

    With ``position_prior`` the decoder also gets ``zero_position_prior``: position-dependent features, zero at
    first (runs saved before it existed are rebuilt without it). With ``slice_position`` (opt-in) it gets a
    ``SlicePrior``: a bias from the slice's position along its volume's axis, zero at first.

    Call it before PEFT wraps any layer of the decoder heads.

    Returns:
        exact names (relative to the decoder) of the tensors resized, added, removed (see ``resize_mask_token_state``).
    """
    if num_classes < 1:
        raise ValueError(f"a semantic decoder needs at least one class, got {num_classes}")
    new_tokens = num_classes + 1
    new_state, changed = resize_mask_token_state(decoder.state_dict(), new_tokens)

    sources = token_sources(decoder.num_mask_tokens, new_tokens)
    weight = decoder.mask_tokens.weight
    decoder.mask_tokens = nn.Embedding(new_tokens, decoder.transformer_dim).to(weight)
    decoder.output_hypernetworks_mlps = nn.ModuleList(
        copy.deepcopy(decoder.output_hypernetworks_mlps[s]) for s in sources
    )
    last = decoder.iou_prediction_head.layers[-1]
    decoder.iou_prediction_head.layers[-1] = nn.Linear(last.in_features, new_tokens).to(last.weight)
    decoder.load_state_dict(new_state, strict=True)  # an unknown structure fails here instead of staying random

    decoder.num_multimask_outputs = num_classes
    decoder.num_mask_tokens = new_tokens
    decoder.semantic = True
    if position_prior:
        decoder.position_prior = zero_position_prior(decoder.transformer_dim).to(weight)
        changed.extend(f"position_prior.{name}" for name, _ in decoder.position_prior.named_parameters())
    if slice_position:
        decoder.slice_prior = SlicePrior(decoder.transformer_dim).to(weight)
        changed.extend(f"slice_prior.{name}" for name, _ in decoder.slice_prior.named_parameters())
    return changed


class SlicePrior(nn.Module):
    """A slice's position p in [0, 1] along its volume's axis -> a per-channel bias (B, D, 1, 1) for the image
    embedding of a semantic decoder; zero at first, so the decoder starts as without it.

    A whole axial slice is superior or inferior: a 2D prompt-free model must guess it from anatomy, while copying
    the nearest labelled slice knows it from z (issue 18, docs/accuracy.md). Only for data where z means the same
    anatomy in every scan (atlas-aligned, or the rest of a partly labelled volume): ``model.slice_position``.
    Features: p and sin / cos(pi 2^j p) for j < ``frequencies``, then a Linear to D channels.
    """

    def __init__(self, dim: int, frequencies: int = 4) -> None:
        super().__init__()
        self.register_buffer("scales", math.pi * 2.0 ** torch.arange(frequencies), persistent=False)
        self.proj = nn.Linear(1 + 2 * frequencies, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, position: torch.Tensor) -> torch.Tensor:
        """(B,) positions in [0, 1] -> (B, D, 1, 1)."""
        angles = position[:, None] * self.scales.to(position.dtype)
        features = torch.cat([position[:, None], angles.sin(), angles.cos()], dim=1)
        return self.proj(features)[:, :, None, None]


def zero_position_prior(dim: int) -> nn.Conv2d:
    """A 1x1 convolution of the positional encoding, added to the image embedding of a semantic decoder; zero at
    first, so the decoder starts as the pre-trained one.

    Without prompts nothing tells SAM's decoder where an image token lies except the positional encoding mixed in by
    attention, and its masks come from the image tokens alone: classes that differ only by their side (left / right
    kidney, a hemisphere) were painted on both sides (issue 18, docs/accuracy.md). With this map added, the
    upscaled features the class heads read carry their position.
    """
    prior = nn.Conv2d(dim, dim, kernel_size=1)
    nn.init.zeros_(prior.weight)
    nn.init.zeros_(prior.bias)
    return prior


def build_semantic_decoder(
    pretrained: MaskDecoder, num_classes: int, position_prior: bool = True, slice_position: bool = False
) -> tuple[MaskDecoder, list[str]]:
    """A new semantic decoder with ``num_classes`` + 1 outputs from a pre-trained prompted one (left untouched).

    Returns the decoder and the exact names of the tensors resized, added, removed (see ``make_semantic_decoder``).
    """
    decoder = copy.deepcopy(pretrained)
    return decoder, make_semantic_decoder(decoder, num_classes, position_prior, slice_position)
