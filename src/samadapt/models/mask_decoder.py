"""SAM's mask decoder (two-way transformer + hypernetwork heads), also usable as a semantic decoder (SAMed)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from samadapt.models.common import LayerNorm2d


class MaskDecoder(nn.Module):
    """Predict mask logits and their IoU from image and prompt embeddings.

    Prompted (SAM): ``num_multimask_outputs`` + 1 mask tokens; token 0 gives the single-mask output, tokens 1.. the
    multimask outputs. Semantic (SAMed, ``semantic = True`` after ``make_semantic_decoder``): K + 1 tokens, one per
    class with background first, all returned on every call.
    """

    def __init__(
        self,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
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
        self.semantic = False

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: image_embeddings (B or 1, C, h, w), image_pe (1, C, h, w), sparse (B, T, C), dense (B, C, h, w).

        Returns low-res mask logits (B, K, 4h, 4w) and IoU predictions (B, K): K = 1, 3 (multimask), or all the
        class masks in semantic mode.
        """
        masks, iou = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        if self.semantic:
            return masks, iou
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou[:, keep]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens' logits (B, num_mask_tokens, 4h, 4w) and IoU predictions (B, num_mask_tokens)."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)
        if image_embeddings.shape[0] != batch:  # one image, several prompt sets (SAM's convention)
            image_embeddings = image_embeddings.repeat_interleave(batch, dim=0)
        src = image_embeddings + dense_prompt_embeddings
        pos = image_pe.expand(batch, -1, -1, -1)
        b, c, h, w = src.shape
        tokens_out, src = self.transformer(src, pos, tokens)
        iou_token_out = tokens_out[:, 0]
        mask_tokens_out = tokens_out[:, 1 : 1 + self.num_mask_tokens]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
        masks = (hyper @ upscaled.flatten(2)).unflatten(-1, upscaled.shape[-2:])
        return masks, self.iou_prediction_head(iou_token_out)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, sigmoid_output: bool = False):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs, strict=True))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return torch.sigmoid(x) if self.sigmoid_output else x


def make_semantic_decoder(decoder: MaskDecoder, num_classes: int) -> list[str]:
    """Turn a (pre-trained) prompted decoder into a SAMed semantic decoder with ``num_classes`` + 1 outputs, in place.

    The K + 1 mask tokens, hypernetwork MLPs and IoU-head outputs start as copies of the pre-trained ones, taken in
    turn (token i copies pre-trained token i mod 4), so every class starts from a working SAM mask head rather than
    from noise. Returns the names of the tensors whose shape changed (reported, never silent).
    """
    if num_classes < 1:
        raise ValueError(f"a semantic decoder needs at least one class, got {num_classes}")
    old = decoder.num_mask_tokens
    new = num_classes + 1
    source = [i % old for i in range(new)]
    with torch.no_grad():
        tokens = nn.Embedding(new, decoder.transformer_dim).to(decoder.mask_tokens.weight)
        tokens.weight.copy_(decoder.mask_tokens.weight[source])
        decoder.mask_tokens = tokens
        decoder.output_hypernetworks_mlps = nn.ModuleList(
            copy.deepcopy(decoder.output_hypernetworks_mlps[i]) for i in source
        )
        last = decoder.iou_prediction_head.layers[-1]
        head = nn.Linear(last.in_features, new).to(last.weight)
        head.weight.copy_(last.weight[source])
        head.bias.copy_(last.bias[source])
        decoder.iou_prediction_head.layers[-1] = head
    decoder.num_mask_tokens = new
    decoder.num_multimask_outputs = num_classes
    decoder.semantic = True
    changed = ["mask_tokens.weight", f"iou_prediction_head.layers.{len(decoder.iou_prediction_head.layers) - 1}"]
    return changed + [f"output_hypernetworks_mlps.{i}" for i in range(old, new)]
