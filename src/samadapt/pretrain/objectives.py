"""MSA's three self-supervised objectives for the image encoder, on its patch embeddings.

All three perturb the output of the encoder's patch embedding (``image_encoder.patch_embed``) through a forward hook
(``EmbeddingTap``), in square units of ``objective.patch`` model-input pixels, and read the encoder's output grid:

- ``mae``: a fraction of the units get the zero embedding; a linear head reconstructs, from each output token of a
  masked unit, the clean patch embeddings under it (standardised per dimension) - MSE over the masked tokens.
- ``shed``: a fraction of the units are permuted among themselves; a linear head tells, per output token, whether
  its unit was moved - class-balanced binary cross-entropy (chance: ln 2 = 0.693).
- ``emix``: each slice's embeddings are mixed with another slice's, lambda ~ Beta(alpha, alpha); the pooled,
  projected output of the mixture must match the clean outputs of the two slices in proportion lambda, 1 - lambda
  among the batch (soft-target InfoNCE, as i-Mix / DABS e-Mix; the clean outputs are targets, without gradient).

Why the patch embedding and pixel units (docs/pretraining.md): TinyViT's first stages are convolutions, which need a
dense grid, so MAE's "drop the masked tokens" cannot apply; replacing embeddings in place works for both encoders, and
a unit of 16 pixels is a whole number of ViT tokens (16 px), LiteMedSAM embedding cells (1 px) and output tokens (4 px).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samadapt.errors import ConfigError
from samadapt.pretrain.config import ObjectiveConfig

OBJECTIVES = ("mae", "emix", "shed")


@dataclass(frozen=True)
class UnitGrid:
    """How square units of ``patch`` pixels of an (S, S) model input lie on the patch-embedding map (side ``embed``)
    and on the encoder's output grid (side ``out``)."""

    size: int
    embed: int
    out: int
    patch: int

    @property
    def units(self) -> int:
        return self.size // self.patch

    @property
    def cells(self) -> int:
        """Embedding cells per unit side."""
        return self.patch * self.embed // self.size

    @property
    def tokens(self) -> int:
        """Output tokens per unit side."""
        return self.patch * self.out // self.size

    @classmethod
    def of(cls, encoder: nn.Module, patch: int) -> UnitGrid:
        """The grid of a SAM image encoder (ViT or TinyViT).

        Raises:
            ConfigError: ``patch`` is not a whole number of embedding cells and of output tokens.
        """
        size, out = int(encoder.img_size), int(encoder.grid)
        stride = math.prod(m.stride[0] for m in encoder.patch_embed.modules() if isinstance(m, nn.Conv2d))
        embed = size // stride
        for name, step in (("patch embedding cell", stride), ("output token", size // out)):
            if patch % step or size % patch:
                raise ConfigError(
                    f"objective.patch = {patch} px must divide the input side {size} and be a multiple of the "
                    f"encoder's {name} ({step} px)"
                )
        return cls(size, embed, out, patch)

    def valid_units(self, resized: torch.Tensor) -> torch.Tensor:
        """(B, U, U) bool: units holding image rather than padding, from the (B, 2) resized (h, w) of each slice."""
        starts = torch.arange(self.units) * self.patch
        rows = starts[None, :, None] < resized[:, 0, None, None]
        cols = starts[None, None, :] < resized[:, 1, None, None]
        return rows & cols

    def to_cells(self, units: torch.Tensor) -> torch.Tensor:
        """(B, U, U) -> (B, E, E) on the embedding map."""
        return units.repeat_interleave(self.cells, 1).repeat_interleave(self.cells, 2)

    def to_tokens(self, units: torch.Tensor) -> torch.Tensor:
        """(B, U, U) -> (B, G, G) on the output grid."""
        return units.repeat_interleave(self.tokens, 1).repeat_interleave(self.tokens, 2)


def embedding_width(encoder: nn.Module) -> int:
    return [m for m in encoder.patch_embed.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


class EmbeddingTap:
    """A forward hook on ``encoder.patch_embed``: keeps the clean embeddings (``clean``, (B, E, E, C)) and returns
    ``perturb(embeddings)`` instead when ``perturb`` is set. Handles both layouts (ViT: (B, E, E, C); TinyViT:
    (B, C, E, E))."""

    def __init__(self, encoder: nn.Module) -> None:
        self.channels_first = not hasattr(encoder, "pos_embed")  # TinyViT; SAM's ViT adds pos_embed after it
        self.perturb: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.clean: torch.Tensor | None = None
        self._handle = encoder.patch_embed.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        embeddings = output.permute(0, 2, 3, 1) if self.channels_first else output
        self.clean = embeddings.detach()
        if self.perturb is None:
            return output
        changed = self.perturb(embeddings)
        if self.channels_first:
            return changed.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        return changed

    def remove(self) -> None:
        self._handle.remove()


class PretrainHeads(nn.Module):
    """The small heads only pre-training needs (never part of a fine-tuning run): one per objective used.

    ``mae``: Linear(F -> tokens-cells * C) per output token; ``shed``: Linear(F -> 1); ``emix``: MLP(F -> F -> 128).
    """

    def __init__(self, objectives: list[str], features: int, target_width: int, projection: int = 128) -> None:
        super().__init__()
        makers = {
            "mae": lambda: nn.Linear(features, target_width),
            "shed": lambda: nn.Linear(features, 1),
            "emix": lambda: nn.Sequential(nn.Linear(features, features), nn.GELU(), nn.Linear(features, projection)),
        }
        self.heads = nn.ModuleDict({name: makers[name]() for name in objectives})

    def __getitem__(self, name: str) -> nn.Module:
        return self.heads[name]


def choose_units(valid: torch.Tensor, ratio: float, rng: np.random.Generator, minimum: int = 1) -> torch.Tensor:
    """(B, U, U) bool: ``ratio`` of each slice's valid units (at least ``minimum``), drawn from ``rng``."""
    chosen = torch.zeros_like(valid)
    for b in range(valid.shape[0]):
        where = torch.nonzero(valid[b].flatten()).flatten().numpy()
        count = min(len(where), max(minimum, int(round(ratio * len(where)))))
        picked = rng.choice(where, size=count, replace=False) if count else []
        chosen[b].view(-1)[torch.as_tensor(picked, dtype=torch.long)] = True
    return chosen


class Objectives:
    """Computes the objectives' losses for one batch of model inputs.

    Args:
        model: a ``Sam`` whose encoder carries the PEFT parameters being trained.
        heads: the ``PretrainHeads``.
        config: the objectives' settings.
        rng: every random draw (masks, permutations, mixing) comes from it, so a run is reproducible and resumable.
    """

    def __init__(
        self, model: nn.Module, heads: PretrainHeads, config: ObjectiveConfig, rng: np.random.Generator
    ) -> None:
        self.model = model
        self.heads = heads
        self.config = config
        self.rng = rng
        self.grid = UnitGrid.of(model.image_encoder, config.patch)
        self.tap = EmbeddingTap(model.image_encoder)

    def _encode(self, images: torch.Tensor, perturb=None) -> torch.Tensor:
        """(B, 3, S, S) -> output tokens (B, G, G, F), with the patch embeddings perturbed by ``perturb``."""
        self.tap.perturb = perturb
        try:
            return self.model.encode_image(images).permute(0, 2, 3, 1)
        finally:
            self.tap.perturb = None

    def mae(self, images: torch.Tensor, resized: torch.Tensor) -> torch.Tensor:
        grid = self.grid
        valid = grid.valid_units(resized)
        masked = choose_units(valid, self.config.mask_ratio, self.rng)
        cells = grid.to_cells(masked).to(images.device)

        def perturb(embeddings: torch.Tensor) -> torch.Tensor:
            return embeddings.masked_fill(cells[..., None], 0.0)

        tokens = self._encode(images, perturb)
        target = _per_token(self.tap.clean.float(), grid.out)
        keep = grid.to_tokens(valid).to(images.device)
        flat = target[keep]
        target = (target - flat.mean(0)) / (flat.std(0) + 1e-6)  # standardised per dimension over the image area
        error = (self.heads["mae"](tokens).float() - target).pow(2).mean(-1)
        return error[grid.to_tokens(masked).to(images.device)].mean()

    def shed(self, images: torch.Tensor, resized: torch.Tensor) -> torch.Tensor:
        grid = self.grid
        valid = grid.valid_units(resized)
        chosen = choose_units(valid, self.config.shuffle_ratio, self.rng, minimum=2)
        count = grid.units**2
        source = torch.arange(count).repeat(len(images), 1)
        for b in range(len(images)):
            where = torch.nonzero(chosen[b].flatten()).flatten().numpy()
            order = self.rng.permutation(where)
            source[b, torch.as_tensor(order)] = torch.as_tensor(np.roll(order, 1))  # every chosen unit moves
        moved = torch.zeros(len(images), count, dtype=torch.bool)

        def perturb(embeddings: torch.Tensor) -> torch.Tensor:
            units = _to_units(embeddings, grid)
            index = source.to(units.device)[:, :, None, None, None].expand_as(units)
            shuffled = torch.gather(units, 1, index)
            # a unit that received identical content (flat background) was not visibly moved
            scale = units.abs().amax() + 1e-6
            moved.copy_(((shuffled - units).abs().flatten(2).amax(-1) > 1e-3 * scale).cpu())
            return _from_units(shuffled, grid)

        tokens = self._encode(images, perturb)
        logits = self.heads["shed"](tokens)[..., 0].float()
        labels = grid.to_tokens(moved.view(-1, grid.units, grid.units)).to(images.device)
        keep = grid.to_tokens(valid).to(images.device)
        losses = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
        parts = [losses[keep & want].mean() for want in (labels, ~labels) if bool((keep & want).any())]
        return torch.stack(parts).mean()

    def emix(self, images: torch.Tensor, resized: torch.Tensor) -> torch.Tensor:
        batch = len(images)
        if batch < 2:
            raise ConfigError("e-Mix needs at least two slices per batch (train.batch_size >= 2)")
        alpha = self.config.mix_alpha
        lam = torch.as_tensor(self.rng.beta(alpha, alpha, size=batch), dtype=torch.float32)
        order = self.rng.permutation(batch)
        partner = torch.empty(batch, dtype=torch.long)
        partner[torch.as_tensor(order)] = torch.as_tensor(np.roll(order, 1))  # never a slice with itself
        weight = lam.to(images.device)[:, None, None, None]

        def perturb(embeddings: torch.Tensor) -> torch.Tensor:
            return weight * embeddings + (1 - weight) * embeddings[partner.to(embeddings.device)]

        with torch.no_grad():  # the clean slices are the targets (stop-gradient): one backward pass, not two
            clean = F.normalize(self.heads["emix"](self._encode(images).mean((1, 2))).float(), dim=-1)
        mixed = F.normalize(self.heads["emix"](self._encode(images, perturb).mean((1, 2))).float(), dim=-1)
        logits = mixed @ clean.T / self.config.temperature
        target = torch.zeros(batch, batch)
        target[torch.arange(batch), torch.arange(batch)] += lam
        target[torch.arange(batch), partner] += 1 - lam
        return -(target.to(logits.device) * F.log_softmax(logits, dim=-1)).sum(-1).mean()

    def losses(self, method: str, images: torch.Tensor, resized: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss of each objective of ``method`` (``mix``: all three) and their weighted sum under ``loss``."""
        names = OBJECTIVES if method == "mix" else (method,)
        values = {name: getattr(self, name)(images, resized) for name in names}
        weights = {name: getattr(self.config, name) if method == "mix" else 1.0 for name in names}
        values["loss"] = sum(weights[name] * values[name] for name in names)
        return values


def objectives_of(method: str) -> list[str]:
    return list(OBJECTIVES) if method == "mix" else [method]


def mae_target_width(encoder: nn.Module, patch: int) -> int:
    """Width of one output token's reconstruction target: the embedding cells under it times their channels."""
    grid = UnitGrid.of(encoder, patch)
    per_token = grid.embed // grid.out
    return per_token * per_token * embedding_width(encoder)


def _per_token(embeddings: torch.Tensor, out: int) -> torch.Tensor:
    """(B, E, E, C) -> (B, G, G, k * k * C): the embedding cells under each output token (k = E / G)."""
    b, e, _, c = embeddings.shape
    k = e // out
    return embeddings.reshape(b, out, k, out, k, c).permute(0, 1, 3, 2, 4, 5).reshape(b, out, out, k * k * c)


def _to_units(embeddings: torch.Tensor, grid: UnitGrid) -> torch.Tensor:
    """(B, E, E, C) -> (B, U * U, cells, cells, C)."""
    b, _, _, c = embeddings.shape
    u, k = grid.units, grid.cells
    return embeddings.reshape(b, u, k, u, k, c).permute(0, 1, 3, 2, 4, 5).reshape(b, u * u, k, k, c)


def _from_units(units: torch.Tensor, grid: UnitGrid) -> torch.Tensor:
    b, _, _, _, c = units.shape
    u, k = grid.units, grid.cells
    return units.reshape(b, u, u, k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(b, u * k, u * k, c)
