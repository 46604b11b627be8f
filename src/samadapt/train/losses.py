"""Segmentation losses: weighted cross-entropy + Dice (MONAI's DiceCELoss), binary or multi-class."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from torch import nn


class SegmentationLoss(nn.Module):
    """``ce_weight * CE + dice_weight * Dice`` on logits.

    Binary (prompted) masks: logits (B, 1, H, W), target (B, 1, H, W) in {0, 1}; BCE with logits, sigmoid Dice.
    Semantic masks: logits (B, K + 1, H, W), target (B, 1, H, W) integer labels; softmax CE and Dice over all
    classes including background (SAMed's choice).
    """

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0, multiclass: bool = False) -> None:
        super().__init__()
        if ce_weight < 0 or dice_weight < 0 or ce_weight + dice_weight == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got ce={ce_weight}, dice={dice_weight}")
        self.multiclass = multiclass
        self.loss = DiceCELoss(
            sigmoid=not multiclass,
            softmax=multiclass,
            to_onehot_y=multiclass,
            lambda_ce=ce_weight,
            lambda_dice=dice_weight,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype) if not self.multiclass else target.long()
        return self.loss(logits.float(), target)
