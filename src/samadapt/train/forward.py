"""The differentiable part of a training step: encode, decode with the batch's prompts, the loss (``LossForward``,
one module so that DDP can wrap it), and the IoU target the IoU head learns (``mask_iou``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samadapt.errors import TrainingError
from samadapt.train.samples import PreparedSlice, add_corrective_clicks


class LossForward(nn.Module):
    """The differentiable part of a training step, as one module so that DDP can wrap it.

    Prompted task: encode once, decode, then ``rounds`` decoder-only rounds on the same embedding, each adding a
    click in the error region of the previous prediction (MSA's iterative training); the loss is the mean over
    rounds. Semantic task (no prompts): decode all class masks at once.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        rounds: int,
        rng: np.random.Generator,
        iou_weight: float = 0.0,
        multimask: bool = False,
    ) -> None:
        super().__init__()
        self.multimask = multimask
        self.model = model
        self.loss_fn = loss_fn
        self.rounds = rounds
        self.rng = rng
        self.iou_weight = iou_weight

    def _loss(self, logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mask loss, plus (prompted task) the IoU head's MSE against the true IoU of the thresholded mask."""
        upsampled = _upsample(logits, targets.shape[-1])
        loss = self.loss_fn(upsampled, targets)
        if self.iou_weight:
            loss = loss + self.iou_weight * F.mse_loss(iou_pred.float(), mask_iou(upsampled.detach() > 0, targets > 0))
        return loss

    def _best_of_candidates(
        self, logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's loss for an ambiguous prompt: per sample, only the candidate mask closest to the target (lowest
        mask loss) is penalised, the others stay free to answer other readings of the click; the IoU head learns
        every candidate's true IoU, which is what ``Predictor`` selects by. Returns the loss and the chosen
        candidates' logits (B, 1, h, w) (the mask prompt of a next round)."""
        upsampled = _upsample(logits, targets.shape[-1])
        count, candidates = logits.shape[:2]
        per = torch.stack(
            [
                torch.stack(
                    [self.loss_fn(upsampled[i : i + 1, k : k + 1], targets[i : i + 1]) for k in range(candidates)]
                )
                for i in range(count)
            ]
        )
        best = per.detach().argmin(1)
        rows = torch.arange(count, device=logits.device)
        loss = per[rows, best.to(logits.device)].mean()
        if self.iou_weight:
            loss = loss + self.iou_weight * F.mse_loss(iou_pred.float(), mask_iou(upsampled.detach() > 0, targets > 0))
        return loss, logits[rows, best][:, None]

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        box_rows: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        slice_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeddings = self.model.encode_image(images)
        if box_rows is None:
            return self._decode_loss(embeddings, targets, points, boxes, text, slice_position)
        # mixed prompts: the box samples and the click samples decoded apart, the loss their sample-weighted mean
        loss = embeddings.new_zeros(())
        for rows, use_box in ((box_rows.nonzero()[:, 0], True), ((~box_rows).nonzero()[:, 0], False)):
            if len(rows):
                rows = rows.to(images.device)
                group_points = None if use_box else tuple(t[rows] for t in points)
                group_boxes = boxes[rows] if use_box else None
                part = self._decode_loss(embeddings[rows], targets[rows], group_points, group_boxes)
                loss = loss + part * len(rows) / len(box_rows)
        return loss

    def _decode_loss(
        self,
        embeddings: torch.Tensor,
        targets: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        text: torch.Tensor | None = None,
        slice_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        size = targets.shape[-1]
        # one click alone is ambiguous: as SAM, train its three candidates (``Predictor`` keeps the best-rated one)
        single = self.multimask and boxes is None and text is None and points is not None and points[1].shape[1] == 1
        logits, iou_pred = self.model.decode(
            embeddings, points, boxes, multimask_output=single, text=text, slice_position=slice_position
        )
        if points is None and boxes is None and text is None:
            return self.loss_fn(_upsample(logits, size), targets)
        if single:
            loss, logits = self._best_of_candidates(logits, iou_pred, targets)
        else:
            loss = self._loss(logits, iou_pred, targets)
        for _ in range(self.rounds):
            with torch.no_grad():
                predictions = (_upsample(logits, size) > 0).cpu()
            cpu_points = None if points is None else tuple(t.cpu() for t in points)
            points = tuple(
                t.to(embeddings.device) for t in add_corrective_clicks(cpu_points, targets.cpu(), predictions, self.rng)
            )
            logits, iou_pred = self.model.decode(embeddings, points, boxes, mask_inputs=logits.detach(), text=text)
            loss = loss + self._loss(logits, iou_pred, targets)
        return loss / (1 + self.rounds)


def slice_positions(batch: Sequence[PreparedSlice]) -> torch.Tensor:
    """(B,) float32 positions of a batch's slices along their axes, for a model with ``model.slice_position``.

    Raises:
        TrainingError: a slice carries no position (an item without ``position``: give ``SliceDataset`` items).
    """
    missing = [s.case or "?" for s in batch if s.position is None]
    if missing:
        raise TrainingError(
            f"model.slice_position needs each slice's position, and slices of {sorted(set(missing))} carry none "
            "(items need a 'position', as SliceDataset items have)"
        )
    return torch.tensor([s.position for s in batch], dtype=torch.float32)


def _upsample(logits: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of boolean (B, K, H, W) masks per (sample, mask): (B, K) float; 1.0 when both are empty (a correct
    "nothing here" answer), the target the IoU head learns."""
    inter = (pred & target).flatten(2).sum(-1).float()
    union = (pred | target).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
