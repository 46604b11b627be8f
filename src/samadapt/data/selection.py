"""What a run trains and validates on, chosen from a dataset: the case split, the labelled slices (all,
or a few exemplars), a few target-free slices, the validation slices, and synthetic slices.

Everything is chosen among the training cases only (a validation case never leaks into training) and seeded, so the
same seed chooses the same slices.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from samadapt.data.datasets import DatasetSpec, SliceDataset
from samadapt.errors import DataError, TrainingError

log = logging.getLogger(__name__)


class CaseSplit(NamedTuple):
    """Case ids of each part of a split."""

    train: list[str]
    val: list[str]
    test: list[str]


def _count(part: float | int, total: int) -> int:
    return int(round(part * total)) if isinstance(part, float) and 0 < part < 1 else int(part)


def split_dataset(spec: DatasetSpec, val: float | int = 0.2, test: float | int = 0, seed: int = 0) -> CaseSplit:
    """Split cases (never slices, so no case leaks across parts) into train / val / test, seeded.

    ``val`` and ``test`` are case counts (int) or fractions (float in (0, 1)); each part keeps dataset order.

    Raises:
        DataError: the held-out parts would leave no training case.
    """
    ids = [c.id for c in spec.cases]
    n_val, n_test = _count(val, len(ids)), _count(test, len(ids))
    if n_val < 0 or n_test < 0 or n_val + n_test >= len(ids):
        raise DataError(f"{spec.root}: cannot hold out {n_val} val + {n_test} test of {len(ids)} cases")
    order = np.random.default_rng(seed).permutation(len(ids))
    val_ids = {ids[i] for i in order[:n_val]}
    test_ids = {ids[i] for i in order[n_val : n_val + n_test]}
    return CaseSplit(
        [i for i in ids if i not in val_ids | test_ids],
        [i for i in ids if i in val_ids],
        [i for i in ids if i in test_ids],
    )


def split_cases(spec: DatasetSpec, val_cases: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Hold out ``val_cases`` cases (seeded) -> (train ids, val ids); with a single case nothing is held out."""
    if len(spec.cases) <= 1 or val_cases <= 0:
        return [c.id for c in spec.cases], []
    split = split_dataset(spec, val=min(int(val_cases), len(spec.cases) - 1), seed=seed)
    return split.train, split.val


@dataclass
class TrainingSelection:
    """Slice indices into ``slices``: ``labelled`` (the exemplars, or every labelled training slice), ``empty``
    (target-free training slices added to them), ``val`` (the validation slices)."""

    slices: SliceDataset
    train_cases: list[str]
    val_cases: list[str]
    labelled: list[int]
    empty: list[int]
    val: list[int]

    def val_items(self) -> list[dict]:
        return [self.slices[i] for i in self.val]


def chosen_classes(available: dict[int, str], wanted: Sequence[int] | None, root: Path) -> dict[int, str]:
    """The classes a run learns: ``wanted`` (all of ``available`` when None), with their names.

    Raises:
        TrainingError: a wanted class is not in the dataset.
    """
    if wanted is None:
        return dict(available)
    missing = [c for c in wanted if c not in available]
    if missing:
        raise TrainingError(f"{root}: classes {missing} are not in dataset.json (has {sorted(available)})")
    return {c: available[c] for c in wanted}


def select_training(
    spec: DatasetSpec,
    classes: Sequence[int],
    *,
    axis: int | None = None,
    val_cases: int = 0,
    seed: int = 0,
    exemplars: int = 0,
    empty_slices: bool = True,
    val_slices: int = 16,
) -> TrainingSelection:
    """Split the cases (``val_cases`` held out), choose the labelled training slices (``exemplars`` of them when
    given, else all), add target-free slices (``empty_slices``: a quarter as many, at least one; they teach a
    prompted model that a click on background means "nothing here") and up to ``val_slices`` validation slices spread
    evenly over the held-out cases' labelled slices.

    Raises:
        TrainingError: no training slice holds any of ``classes``.
    """
    slices = SliceDataset(spec, axis=axis)
    train_cases, held_out = split_cases(spec, val_cases, seed)
    labelled = slices.indices(list(classes), train_cases)
    if not labelled:
        raise TrainingError(f"{spec.root}: no training slice holds any of the classes {sorted(classes)}")
    chosen = labelled
    if exemplars:
        from samadapt.data.synthesis import select_exemplars

        # chosen among the training cases only: --exemplars N trains on exactly N labelled slices
        chosen = select_exemplars(slices, exemplars, list(classes), seed=seed, cases=train_cases)
        log.info("exemplars: %s", [slices.slices[i][:2] for i in chosen])
    with_target = set(labelled)
    free = [i for i in slices.indices(None, train_cases) if i not in with_target]
    rng = np.random.default_rng(seed)
    extra = list(rng.choice(free, size=min(len(free), max(1, len(chosen) // 4)), replace=False)) if free else []
    val_pool = slices.indices(list(classes), held_out) if held_out else []
    val_pick = np.linspace(0, len(val_pool) - 1, num=min(len(val_pool), val_slices)).astype(int)
    val = [val_pool[i] for i in sorted(set(val_pick))] if val_pool else []
    empty = [int(i) for i in extra] if empty_slices else []
    return TrainingSelection(slices, train_cases, held_out, list(chosen), empty, val)


def synthetic_items(
    selection: TrainingSelection,
    classes: Sequence[int],
    *,
    directory: str | Path | None = None,
    on_the_fly: bool = False,
    size: int = 0,
    seed: int = 0,
) -> Sequence[dict]:
    """Slices of a synthesised set: a dataset ``directory`` (from ``samadapt synth``), or, ``on_the_fly``, ``size``
    slices made now from the selected labelled slices on backgrounds from the training cases only; none otherwise.

    Raises:
        TrainingError: synthesis on the fly, and the training cases have no target-free background slice.
    """
    if directory:
        from samadapt.data.datasets import load_dataset

        synthetic = SliceDataset(load_dataset(directory))
        return synthetic.subset(range(len(synthetic)))
    if not on_the_fly:
        return []
    from samadapt.data.synthesis import SynthesisConfig, background_slices, synthesize

    slices = selection.slices
    picked = background_slices(slices, list(classes), cases=selection.train_cases, seed=seed)
    backgrounds = [slices[i]["image"] for i in picked]
    if not backgrounds:
        raise TrainingError("synthesis needs target-free background slices, and the dataset has none")
    exemplars = [slices[i] for i in selection.labelled]
    return synthesize(exemplars, backgrounds, size, SynthesisConfig(), seed=seed)
