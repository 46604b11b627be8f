"""The assembled Segment Anything model: image encoder, prompt encoder, mask decoder.

All images enter as (B, 3, S, S) floats in [0, 1] (S = ``img_size``, already resized and padded); ``normalize``
applies the checkpoint's own rule (SAM: x 255, pixel mean / std; MedSAM and LiteMedSAM: as is).
"""

from __future__ import annotations

import torch
from torch import nn

from samadapt.models.common import MODEL_SLOTS, is_empty_slot

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    """SAM with an explicit, differentiable forward (no ``torch.no_grad`` inside, so it can be trained).

    Args:
        image_encoder: maps (B, 3, S, S) to (B, 256, S/16, S/16).
        prompt_encoder: embeds points / boxes / masks.
        mask_decoder: predicts mask logits and IoU from image and prompt embeddings.
        pixel_mean, pixel_std, input_scale: ``normalize(x) = (x * input_scale - mean) / std``.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        pixel_mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
        pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0),
        input_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # slot: (P, E) text embeddings -> (P, T, C) prompt tokens; empty unless text prompting is applied (peft)
        self.text_prompt: nn.Module = MODEL_SLOTS["text_prompt"]()
        self.input_scale = input_scale
        # not persistent: checkpoints do not carry them, the builder sets them
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> what the image encoder was trained on."""
        return (images * self.input_scale - self.pixel_mean) / self.pixel_std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> image embeddings (B, 256, S/16, S/16)."""
        return self.image_encoder(self.normalize(images))

    def decode(
        self,
        image_embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = False,
        text: torch.Tensor | None = None,
        slice_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks for prompts on already encoded images.

        Args:
            image_embeddings: (B, 256, h, w), one per prompt set, or (1, 256, h, w) shared by all prompt sets.
            points: coordinates (P, N, 2) in (x, y) model-input pixels and labels (P, N) (1 fg, 0 bg, -1 pad).
            boxes: (P, 4) XYXY in model-input pixels.
            mask_inputs: (P, 1, 4h, 4w) low-res logits from a previous round.
            multimask_output: three masks per prompt set instead of one.
            text: (P, E) sentence embeddings, turned into prompt tokens by the ``text_prompt`` slot and appended to
                the sparse tokens (alone, or with points / boxes).
            slice_position: (B,) positions in [0, 1] of the slices along their volume's axis, for (and only for) a
                semantic decoder built with ``slice_position`` (``takes_slice_position``).

        Returns:
            low-res mask logits (P, K, 4h, 4w) and predicted IoU (P, K).
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_inputs)
        if text is not None:
            if is_empty_slot(self.text_prompt):
                raise ValueError("this model has no text projection: train it with prompt.kind=text first")
            tokens = self.text_prompt(text).to(sparse.dtype)
            if sparse.shape[0] == 1 and tokens.shape[0] > 1:
                sparse, dense = sparse.expand(tokens.shape[0], -1, -1), dense.expand(tokens.shape[0], -1, -1, -1)
            elif sparse.shape[0] != tokens.shape[0]:
                raise ValueError(f"{tokens.shape[0]} texts for {sparse.shape[0]} prompt sets")
            sparse = torch.cat([sparse, tokens], dim=1)
        images, prompts = image_embeddings.shape[0], sparse.shape[0]
        if prompts == 1 and images > 1:  # no prompt (semantic) or one prompt set for every image
            sparse, dense = sparse.expand(images, -1, -1), dense.expand(images, -1, -1, -1)
        elif images == 1 and prompts > 1:  # several prompt sets on one image
            image_embeddings = image_embeddings.expand(prompts, -1, -1, -1)
        elif images != prompts:
            raise ValueError(
                f"{images} image embeddings for {prompts} prompt sets: give one embedding per prompt set, "
                "or one shared embedding"
            )
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            slice_position=slice_position,
        )

    def forward(
        self,
        images: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = False,
        text: torch.Tensor | None = None,
        slice_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode (B, 3, S, S) images in [0, 1] and decode one prompt set per image (see ``decode``)."""
        embeddings = self.encode_image(images)
        return self.decode(embeddings, points, boxes, mask_inputs, multimask_output, text, slice_position)


def takes_slice_position(model: nn.Module) -> bool:
    """Whether a model's decoder reads the slice position (a semantic run built with ``model.slice_position``)."""
    return getattr(getattr(model, "mask_decoder", None), "slice_prior", None) is not None
