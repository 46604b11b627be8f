"""Segmentation losses: weighted cross-entropy + Dice, binary or multi-class (Dice terms from MONAI's DiceLoss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from torch import nn


def balanced_class_weights(target: torch.Tensor, num_channels: int, power: float = 0.5) -> torch.Tensor:
    """Per-class cross-entropy weights for one batch: ``frequency ** -power`` of each class among the target pixels
    (1 for classes absent from the batch, which no pixel uses), normalised to a pixel-weighted mean of 1.

    ``power`` 0.5 (inverse square root) lifts a class covering 1 % of the pixels tenfold against one covering all of
    them, without letting a handful of pixels dominate as plain inverse frequency would.

    Args:
        target: (B, 1, H, W) or (B, H, W) integer labels in [0, num_channels).
        num_channels: K + 1 (background first).
    """
    counts = torch.bincount(target.reshape(-1).long(), minlength=num_channels)[:num_channels].float()
    total = counts.sum().clamp(min=1)
    weights = torch.ones(num_channels, device=target.device)
    present = counts > 0
    weights[present] = (counts[present] / total) ** -power
    weights[present] /= (weights * counts).sum() / total
    return weights


class SegmentationLoss(nn.Module):
    """``ce_weight * CE + dice_weight * Dice`` on logits.

    Binary (prompted) masks: logits (B, 1, H, W), target (B, 1, H, W) in {0, 1}; BCE with logits, sigmoid Dice.

    Semantic masks: logits (B, K + 1, H, W), target (B, 1, H, W) integer labels (0 background). Softmax CE over all
    K + 1 classes, class-balanced per batch (``balanced_class_weights``) unless ``balance`` is False; soft Dice over
    the batch (all its pixels at once) for each FOREGROUND class present in the batch's targets, averaged over those
    classes. SAMed's code averages a per-sample Dice over every channel, background included. With few slices and
    many small classes that makes the all-background answer a flat plateau: background (most of the pixels) scores a
    near-perfect Dice, and a class absent from a sample scores Dice 0 (loss 1) whatever the model does, a constant
    share of the loss with no gradient; the small classes present are left a small share of a loss that hardly moves
    (0.79 from first to last step in issue 18). False positives of absent classes are still penalised by the CE term.
    """

    def __init__(
        self, ce_weight: float = 1.0, dice_weight: float = 1.0, multiclass: bool = False, balance: bool = True
    ) -> None:
        super().__init__()
        if ce_weight < 0 or dice_weight < 0 or ce_weight + dice_weight == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got ce={ce_weight}, dice={dice_weight}")
        self.multiclass = multiclass
        self.ce_weight, self.dice_weight, self.balance = ce_weight, dice_weight, balance
        if multiclass:
            self.dice = DiceLoss(softmax=True, to_onehot_y=True, include_background=False, batch=True, reduction="none")
        else:
            self.loss = DiceCELoss(sigmoid=True, lambda_ce=ce_weight, lambda_dice=dice_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not self.multiclass:
            return self.loss(logits.float(), target.to(logits.dtype))
        logits, target = logits.float(), target.long()
        if target.dim() == 3:
            target = target[:, None]
        channels = logits.shape[1]
        weights = balanced_class_weights(target, channels) if self.balance else None
        loss = self.ce_weight * F.cross_entropy(logits, target[:, 0], weight=weights)
        if self.dice_weight:
            per_class = self.dice(logits, target).reshape(-1)  # (K,): classes 1..K
            present = torch.bincount(target.reshape(-1), minlength=channels)[1:channels] > 0
            if present.any():
                loss = loss + self.dice_weight * per_class[present].mean()
        return loss
