"""Unlabelled slices for pre-training, streamed through the same path as training: ``SliceDataset`` (memory-mapped
preprocessed volumes) and ``transforms.model_input``."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from samadapt.data.datasets import SliceDataset, load_dataset, unlabelled_view
from samadapt.transforms import model_input


def unlabelled_slices(path: str, axis: int | None = None, test_images: bool = True) -> SliceDataset:
    """Every slice of a dataset folder's images, labels ignored (with ``test_images``, imagesTs / test too)."""
    spec = unlabelled_view(load_dataset(path), test_images)
    return SliceDataset(spec, axis=axis)


class ModelInputs(Dataset):
    """``slices[i]`` put on the model-input grid: (image (3, S, S) in [0, 1], resized (h, w) of the image inside
    the padded square). Read by DataLoader workers."""

    def __init__(self, slices: SliceDataset, img_size: int) -> None:
        self.slices = slices
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, geometry = model_input(self.slices[i]["image"], self.img_size)
        return image[0], torch.tensor(geometry.resized)


def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> images (B, 3, S, S), resized (B, 2)."""
    return torch.stack([image for image, _ in items]), torch.stack([size for _, size in items])
