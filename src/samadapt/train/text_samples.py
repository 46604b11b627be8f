"""Training samples for text prompts: per slice a text target (one class, or several named by one phrase), a phrase
for it drawn from the run's phrase book, and its mask (the union of the named classes' masks).

Augmentation keeps the orientation (``train.augment``): a phrase may name a side ("left grey matter"), which a flip
would contradict.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from samadapt.prompts import box_from_mask
from samadapt.text.phrases import PhraseBook, TextTarget
from samadapt.train.config import PromptConfig
from samadapt.train.samples import PreparedSlice, PromptBatch, random_points


def choose_text_target(
    present: Sequence[int], classes: Sequence[int], book: PhraseBook, group_share: float, rng: np.random.Generator
) -> TextTarget:
    """A text target for a slice holding ``present`` (of the learned ``classes``): a present class, or with
    probability ``group_share`` a phrase-book group that includes it; a slice holding none of them gets a random
    class (its target is then empty: the model learns that the named structure is not there)."""
    if not present:
        return book.for_class(classes[int(rng.integers(len(classes)))])
    class_id = present[int(rng.integers(len(present)))]
    groups = [g for g in book.groups_with(class_id) if set(g.targets) <= set(classes)]
    if groups and rng.random() < group_share:
        return groups[int(rng.integers(len(groups)))]
    return book.for_class(class_id)


def target_mask(label: np.ndarray, target: TextTarget) -> np.ndarray:
    """The union of the masks of every class the text names (S, S) bool."""
    return np.isin(label, target.targets)


def draw_text_batch(
    slices: Sequence[PreparedSlice],
    picks: Sequence[int],
    classes: Sequence[int],
    book: PhraseBook,
    prompt: PromptConfig,
    kind: str,
    rng: np.random.Generator,
    do_augment: bool,
) -> PromptBatch:
    """One text target per picked slice, a training phrase for it, and (``text+point`` / ``text+box``) clicks in /
    the box of its mask. ``kind``: ``text``, ``text+point`` or ``text+box``."""
    from samadapt.train.augment import augment

    images, targets, texts, coords, boxes = [], [], [], [], []
    for pick in picks:
        image, label = slices[pick].image, slices[pick].label
        if do_augment:
            image, label = augment(image, label, rng)
        present = sorted(set(np.unique(label).tolist()) & set(classes))
        target = choose_text_target(present, list(classes), book, prompt.text_groups, rng)
        mask = target_mask(label, target)
        texts.append(target.train[int(rng.integers(len(target.train)))])
        if mask.any():
            coords.append(random_points(mask, prompt.points, rng))
            boxes.append(box_from_mask(mask, jitter=prompt.box_jitter, rng=rng))
        else:
            coords.append(random_points(~mask, prompt.points, rng))
            boxes.append(np.array([0, 0, mask.shape[1] - 1, mask.shape[0] - 1], dtype=np.float32))
        images.append(image)
        targets.append(torch.from_numpy(mask)[None].float())
    points = None
    if kind == "text+point":
        labels = torch.tensor([[1 if t.any() else 0] * prompt.points for t in targets])
        points = (torch.from_numpy(np.stack(coords)), labels)
    box_tensor = torch.from_numpy(np.stack(boxes).astype(np.float32)) if kind == "text+box" else None
    return PromptBatch(torch.stack(images), torch.stack(targets), points, box_tensor, texts=texts)
