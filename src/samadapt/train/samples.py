"""Training samples: slices put on the model-input grid once, then drawn with an object, a target and prompts.

Everything random goes through one ``numpy.random.Generator`` owned by the trainer, so a run is reproducible from its
seed and resumable from a saved generator state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from samadapt.data.datasets import SliceInfo
from samadapt.prompts import box_from_mask, corrective_click, objects
from samadapt.train.config import PromptConfig
from samadapt.transforms import model_input


@dataclass
class PreparedSlice:
    """A slice on the model-input grid: image (3, S, S) in [0, 1], label (S, S) int64 (0 in the padding); position
    along its volume's axis in [0, 1] (``data.position``), None for an item that carries none."""

    image: torch.Tensor
    label: np.ndarray
    case: str
    index: int
    classes: tuple[int, ...]
    position: float | None = None


def prepare_slice(item: dict, img_size: int) -> PreparedSlice:
    """An item's preprocessed ``image`` (H, W[, 3]) through ``model_input``, its ``label`` (H, W) onto the same grid
    (nearest neighbour)."""
    tensor, geometry = model_input(item["image"], img_size)
    label = torch.from_numpy(np.asarray(item["label"], dtype=np.int64))[None, None].float()
    label = geometry.image_to_input(label, mode="nearest")[0, 0].round().long().numpy()
    classes = tuple(int(c) for c in np.unique(label) if c != 0)
    position = None if item.get("position") is None else float(item["position"])
    return PreparedSlice(tensor[0], label, str(item.get("case", "")), int(item.get("slice", 0)), classes, position)


def prepare_slices(items: Sequence[dict], img_size: int) -> list[PreparedSlice]:
    """``prepare_slice`` for every item, kept in memory (small sets and tests; training streams ``TrainingSlices``)."""
    return [prepare_slice(item, img_size) for item in items]


class ItemChain(Sequence):
    """Several item sequences (lists of dicts, or lazy ``SliceSubset`` views of a dataset) read as one."""

    def __init__(self, *parts: Sequence[dict]) -> None:
        self.parts = [p for p in parts if len(p)]
        self.starts = np.cumsum([0, *(len(p) for p in self.parts)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int) -> tuple[Sequence[dict], int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part], i - int(self.starts[part])

    def __getitem__(self, i: int) -> dict:
        part, k = self._locate(i)
        return part[k]

    def info(self, i: int) -> SliceInfo:
        part, k = self._locate(i)
        return item_info(part, k)


def item_info(items: Sequence[dict], k: int) -> SliceInfo:
    """The ``SliceInfo`` of ``items[k]``: from the dataset's index when the sequence knows it, else from the item."""
    if hasattr(items, "info"):
        return items.info(k)
    item = items[k]
    classes = tuple(int(c) for c in np.unique(np.asarray(item["label"])) if c != 0)
    return SliceInfo(str(item.get("case", "")), int(item.get("slice", 0)), classes)


class TrainingSlices(Dataset):
    """Training slices, put on the model-input grid when drawn: memory holds only what a batch needs.

    ``items`` is any sequence of slice dicts (a list, or lazy views of a ``SliceDataset`` whose volumes are
    memory-mapped); ``infos`` (case, position, classes of every slice) is all that sampling reads. A DataLoader's
    worker processes call ``__getitem__``.
    """

    def __init__(self, items: Sequence[dict], img_size: int) -> None:
        self.items = items
        self.img_size = img_size
        self.infos = [item_info(items, k) for k in range(len(items))]
        self.lazy = hasattr(items, "info")  # read from disk on demand (worth worker processes)

    def __len__(self) -> int:
        return len(self.infos)

    def __getitem__(self, i: int) -> PreparedSlice:
        return prepare_slice(self.items[i], self.img_size)


def augment(image: torch.Tensor, label: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """A random flip and 90-degree rotation, the same for image and label."""
    turns = int(rng.integers(4))
    flip = bool(rng.integers(2))
    if flip:
        image, label = image.flip(-1), label[:, ::-1]
    if turns:
        image, label = torch.rot90(image, turns, (-2, -1)), np.rot90(label, turns)
    return image, np.ascontiguousarray(label)


def object_masks(label: np.ndarray, classes: Sequence[int], mode: str) -> list[np.ndarray]:
    """Binary masks of the objects in a label map: one per class present, or one per connected component."""
    return [mask for _, mask in objects(label, list(classes), mode)]


def random_points(mask: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct random (x, y) pixels of a non-empty mask (repeats if the mask is smaller)."""
    ys, xs = np.nonzero(mask)
    chosen = rng.choice(len(xs), size=count, replace=len(xs) < count)
    return np.stack([xs[chosen], ys[chosen]], axis=-1).astype(np.float32)


@dataclass
class PromptBatch:
    """A batch for the prompted task: images (B, 3, S, S), binary targets (B, 1, S, S), and prompts.

    points: (coords (B, N, 2) in (x, y) input pixels, labels (B, N)) or None; boxes (B, 4) XYXY or None.
    box_rows: for mixed prompts, (B,) bool: the samples prompted by their box (the others by their points); both
    ``points`` and ``boxes`` then hold every sample's. None: every sample takes every prompt given.
    texts: one phrase per sample (text prompts, ``train.text_samples``) or None.
    """

    images: torch.Tensor
    targets: torch.Tensor
    points: tuple[torch.Tensor, torch.Tensor] | None
    boxes: torch.Tensor | None
    box_rows: torch.Tensor | None = None
    texts: list[str] | None = None


def draw_prompt_batch(
    slices: Sequence[PreparedSlice],
    picks: Sequence[int],
    classes: Sequence[int],
    prompt: PromptConfig,
    kind: str,
    rng: np.random.Generator,
    do_augment: bool,
) -> PromptBatch:
    """One object per picked slice (random class or component), its binary mask, and a point or box prompt.

    ``kind`` ``mixed``: each object independently takes its box with probability ``prompt.box_share``, else its
    clicks (``PromptBatch.box_rows``), so that one step teaches both and box ability is kept while clicks are learnt.
    Slices without any object of ``classes`` get an empty target and one negative click (no crash, and the model
    learns to answer "nothing here").
    """
    images, targets, coords, boxes = [], [], [], []
    for pick in picks:
        image, label = slices[pick].image, slices[pick].label
        if do_augment:
            image, label = augment(image, label, rng)
        masks = object_masks(label, classes, prompt.objects)
        if masks:
            mask = masks[int(rng.integers(len(masks)))]
            coords.append(random_points(mask, prompt.points, rng))
            boxes.append(box_from_mask(mask, jitter=prompt.box_jitter, rng=rng))
        else:
            mask = np.zeros_like(label, dtype=bool)
            coords.append(random_points(~mask, prompt.points, rng))
            boxes.append(np.array([0, 0, mask.shape[1] - 1, mask.shape[0] - 1], dtype=np.float32))
        images.append(image)
        targets.append(torch.from_numpy(mask)[None].float())
    point_labels = torch.tensor([[1 if t.any() else 0] * prompt.points for t in targets])
    points = (torch.from_numpy(np.stack(coords)), point_labels) if kind in ("point", "mixed") else None
    box_tensor = torch.from_numpy(np.stack(boxes).astype(np.float32)) if kind in ("box", "mixed") else None
    box_rows = None
    if kind == "mixed":  # drawn after the objects, so that point / box runs draw the same objects as before
        box_rows = torch.from_numpy(rng.random(len(targets)) < prompt.box_share)
    return PromptBatch(torch.stack(images), torch.stack(targets), points, box_tensor, box_rows)


def add_corrective_clicks(
    points: tuple[torch.Tensor, torch.Tensor] | None,
    targets: torch.Tensor,
    predictions: torch.Tensor,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append one click per sample in the largest error region of its current prediction (MSA iterative training).

    Where the prediction is already perfect the new click repeats a padding point (label -1), ignored by SAM.
    """
    new_coords, new_labels = [], []
    for target, pred in zip(targets[:, 0].numpy().astype(bool), predictions[:, 0].numpy(), strict=True):
        click = corrective_click(target, pred, rng=rng)
        if click is None:
            new_coords.append(np.zeros(2, np.float32))
            new_labels.append(-1)
        else:
            new_coords.append(np.array([click.x, click.y], np.float32))
            new_labels.append(1 if click.positive else 0)
    coords = torch.from_numpy(np.stack(new_coords))[:, None]
    labels = torch.tensor(new_labels)[:, None]
    if points is None:
        return coords, labels
    return torch.cat([points[0], coords], 1), torch.cat([points[1], labels], 1)


def semantic_targets(labels: Sequence[np.ndarray], classes: Sequence[int]) -> torch.Tensor:
    """Label maps -> (B, 1, S, S) targets with classes renumbered 1..K in the order given (others: 0)."""
    lookup = np.zeros(max(max(classes), max(int(lab.max()) for lab in labels)) + 1, dtype=np.int64)
    for new, old in enumerate(classes, start=1):
        lookup[old] = new
    return torch.from_numpy(np.stack([lookup[lab] for lab in labels]))[:, None]
