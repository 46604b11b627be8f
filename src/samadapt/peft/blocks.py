"""Where PEFT methods attach: the blocks that offer the slot contract of ``samadapt.models.common``."""

from __future__ import annotations

from torch import nn

from samadapt.models.common import DECODER_BLOCK_SLOTS, ENCODER_BLOCK_SLOTS, has_slots


def encoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The image encoder's attention blocks (ViT blocks, or TinyViT's transformer blocks)."""
    return [m for m in model.image_encoder.modules() if has_slots(m, ENCODER_BLOCK_SLOTS)]


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The mask decoder's two-way blocks, in order."""
    return [m for m in model.mask_decoder.transformer.layers if has_slots(m, DECODER_BLOCK_SLOTS)]
