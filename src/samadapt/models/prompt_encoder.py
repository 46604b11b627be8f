"""SAM's prompt encoder: clicks, boxes and low-res masks into sparse and dense prompt embeddings.

State-dict keys and shapes are those of ``segment_anything.modeling.PromptEncoder`` (official SAM, MedSAM and
LiteMedSAM checkpoints load with ``strict=True``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from samadapt.models.common import LayerNorm2d

# indices into ``PromptEncoder.point_embeddings`` (the order of SAM's checkpoints)
NEGATIVE_POINT, POSITIVE_POINT, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 0, 1, 2, 3


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of 2D positions (SAM's positional encoding).

    A position (x, y) in [0, 1]^2 maps to ``[sin(f), cos(f)]`` with ``f = 2 pi (2 (x, y) - 1) @ G`` and G a fixed
    (2, num_pos_feats) Gaussian matrix (a persistent buffer: checkpoints carry it). Output width: 2 * num_pos_feats.

    The encoding is always computed in float32 (autocast off: bfloat16 coordinates would shift a 1024-pixel click
    by several pixels) and returned in the buffer's dtype.
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _encode(self, unit_coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) (x, y) in [0, 1] -> (..., 2 * num_pos_feats)."""
        gaussian = self.positional_encoding_gaussian_matrix
        with torch.autocast(device_type=unit_coords.device.type, enabled=False):
            centred = 2.0 * unit_coords.float() - 1.0
            phase = 2.0 * math.pi * (centred @ gaussian.float())
            features = torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1)
        return features.to(gaussian.dtype)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an (h, w) grid of cells: (2 * num_pos_feats, h, w)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        rows = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        cols = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """(B, N, 2) (x, y) pixel coordinates of an (H, W) image -> (B, N, 2 * num_pos_feats)."""
        height, width = image_size
        coords = coords_input.float()
        unit = torch.stack([coords[..., 0] / width, coords[..., 1] / height], dim=-1)
        return self._encode(unit)


class PromptEncoder(nn.Module):
    """Embed prompts for the mask decoder.

    Args:
        embed_dim: width C of every prompt embedding (256 in SAM).
        image_embedding_size: (h, w) of the image embedding; dense outputs have this size (64, 64 for SAM at 1024
            and LiteMedSAM at 256).
        input_image_size: (H, W) of the padded model input; points and boxes are pixel coordinates of it.
        mask_in_chans: hidden channels of the mask down-scaler (16).
        activation: activation class of the mask down-scaler.

    Outputs of ``forward``:
        sparse (B, T, C): one token per point (a padding token is appended to points given without a box, as in
        SAM) and two per box (its corners); T = 0 with no point and no box.
        dense (B, C, h, w): the embedded mask prompt, or the learned "no mask" embedding broadcast over the grid.

    ``image_embedding_size`` and ``input_image_size`` can be set after construction (the model at 256, 512 or 1024
    input): the mask-prompt size (4h, 4w) follows; no weight depends on them.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.num_point_embeddings = 4  # negative point, positive point, box top-left, box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    # -- geometry (settable) ----------------------------------------------------------------------------------------

    @property
    def image_embedding_size(self) -> tuple[int, int]:
        """(h, w) of the image embedding."""
        return self._image_embedding_size

    @image_embedding_size.setter
    def image_embedding_size(self, size: tuple[int, int]) -> None:
        self._image_embedding_size = (int(size[0]), int(size[1]))

    @property
    def input_image_size(self) -> tuple[int, int]:
        """(H, W) of the padded model input, in pixels."""
        return self._input_image_size

    @input_image_size.setter
    def input_image_size(self, size: tuple[int, int]) -> None:
        self._input_image_size = (int(size[0]), int(size[1]))

    @property
    def mask_input_size(self) -> tuple[int, int]:
        """(4h, 4w): the size of a mask prompt (the decoder's low-res logits)."""
        return 4 * self._image_embedding_size[0], 4 * self._image_embedding_size[1]

    # -- embeddings -------------------------------------------------------------------------------------------------

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of every image-embedding cell: (1, C, h, w).

        It depends only on the grid size and the fixed Gaussian matrix, so inference (``torch.inference_mode``)
        computes it once and reuses it until either changes (a new size, a load, a move to another device or
        dtype); with autograd on it is computed on every call, as before.
        """
        if not torch.is_inference_mode_enabled():
            return self.pe_layer(self.image_embedding_size).unsqueeze(0)
        gaussian = self.pe_layer.positional_encoding_gaussian_matrix
        key = (self.image_embedding_size, gaussian.device, gaussian.dtype, gaussian.data_ptr(), gaussian._version)
        cached = getattr(self, "_dense_pe_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self.pe_layer(self.image_embedding_size).unsqueeze(0))
            self._dense_pe_cache = cached
        return cached[1]

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """(B, N, 2) (x, y) pixels and (B, N) labels -> (B, N (+1 if pad), C)."""
        coords = coords.float() + 0.5  # the centre of the pixel
        if pad:
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        embedding = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        labels = labels.unsqueeze(-1)
        # padding tokens carry only the "not a point" embedding, no position
        embedding = torch.where(labels == -1, self.not_a_point_embed.weight, embedding)
        embedding = embedding + torch.where(labels == 0, self.point_embeddings[NEGATIVE_POINT].weight, 0.0)
        return embedding + torch.where(labels == 1, self.point_embeddings[POSITIVE_POINT].weight, 0.0)

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 4) (or (B, 1, 4)) XYXY pixels -> (B, 2, C): the two corner tokens."""
        corners = (boxes.float() + 0.5).reshape(-1, 2, 2)
        embedding = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_types = torch.cat(
            [self.point_embeddings[BOX_TOP_LEFT].weight, self.point_embeddings[BOX_BOTTOM_RIGHT].weight]
        )
        return embedding + corner_types

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, 1, 4h, 4w) logits -> (B, C, h, w)."""
        if masks.dim() != 4 or masks.shape[1] != 1 or tuple(masks.shape[-2:]) != self.mask_input_size:
            raise ValueError(
                f"a mask prompt must be (B, 1, {self.mask_input_size[0]}, {self.mask_input_size[1]}) low-res logits "
                f"for a {self.image_embedding_size} image embedding, got {tuple(masks.shape)}"
            )
        return self.mask_downscaling(masks)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed any combination of prompts (all None: the prompt-free embeddings, batch 1).

        Args:
            points: coordinates (B, N, 2) in (x, y) model-input pixels and labels (B, N): 1 positive, 0 negative,
                -1 padding.
            boxes: (B, 4) XYXY in model-input pixels.
            masks: (B, 1, 4h, 4w) mask logits (e.g. the previous low-res prediction).

        Returns:
            sparse (B, T, C) and dense (B, C, h, w) embeddings.
        """
        batch = self._batch_size(points, boxes, masks)
        weight = self.no_mask_embed.weight
        sparse = [weight.new_empty(batch, 0, self.embed_dim)]
        if points is not None:
            coords, labels = points
            sparse.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        sparse_embeddings = torch.cat(sparse, dim=1)
        if masks is not None:
            dense_embeddings = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense_embeddings = weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return sparse_embeddings, dense_embeddings

    @staticmethod
    def _batch_size(
        points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None, masks: torch.Tensor | None
    ) -> int:
        sizes = {}
        if points is not None:
            coords, labels = points
            if coords.dim() != 3 or coords.shape[-1] != 2 or tuple(labels.shape) != tuple(coords.shape[:2]):
                raise ValueError(
                    f"points must be coordinates (B, N, 2) and labels (B, N), got {tuple(coords.shape)} and "
                    f"{tuple(labels.shape)}"
                )
            sizes["points"] = coords.shape[0]
        if boxes is not None:
            if boxes.shape[-1] != 4:
                raise ValueError(f"boxes must be (B, 4) XYXY, got {tuple(boxes.shape)}")
            sizes["boxes"] = boxes.numel() // 4
        if masks is not None:
            sizes["masks"] = masks.shape[0]
        if len(set(sizes.values())) > 1:
            raise ValueError(f"prompt batch sizes differ: {sizes}")
        return next(iter(sizes.values()), 1)
