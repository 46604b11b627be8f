"""Which training slices each micro-batch draws: class-balanced, with a synthetic share, or runs of consecutive
slices for 3D training; a function of (seed, rank, step, micro-batch) alone, so that loader workers can read ahead and
a resumed run draws exactly what an uninterrupted one would."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from samadapt.errors import TrainingError


class SliceDraws:
    """The draws of one training run.

    Args:
        slices: what sampling reads of each training slice (``case``, ``index``, ``classes``: ``SliceInfo`` or
            ``PreparedSlice``); the last ``synthetic`` of them are synthetic.
        classes: the learned class ids.
        synthetic_share: the probability that a draw takes a synthetic slice (when there are any).
        batch_size: slices (or runs of ``depth`` slices) per micro-batch.
        depth: slices per stack (3D training); 1 draws single slices.
    """

    def __init__(
        self,
        slices: Sequence,
        classes: Sequence[int],
        seed: int,
        rank: int = 0,
        batch_size: int = 1,
        depth: int = 1,
        synthetic: int = 0,
        synthetic_share: float = 0.0,
    ) -> None:
        self.slices = slices
        self.classes = list(classes)
        self.seed, self.rank = seed, rank
        self.batch_size, self.depth = batch_size, depth
        self.synthetic, self.synthetic_share = synthetic, synthetic_share

    def picks(self, step: int, micro: int) -> list[int]:
        """The slice indices of micro-batch ``micro`` of step ``step``."""
        rng = np.random.default_rng([self.seed, self.rank, step, micro, 1])
        if self.depth > 1:
            return self._pick_stacks(self.batch_size, self.depth, rng)
        return self._pick(self.batch_size, rng)

    def _pick(self, count: int, rng: np.random.Generator) -> list[int]:
        """Slice indices for one micro-batch, class-balanced (``balanced_picks``): a quarter of the draws (when there
        are any) take a slice without target, the others a learned class uniformly and then a slice holding it.
        With synthetic slices, each draw first picks synthetic (probability ``synthetic_share``) or real."""
        if not self.synthetic:
            return draw_balanced(self._class_pools, count, rng)
        real_pools, synthetic_pools = self._class_pools, self._synthetic_pools
        picks = []
        for _ in range(count):
            synthetic = synthetic_pools is not None and rng.random() < self.synthetic_share
            picks += draw_balanced(synthetic_pools if synthetic else real_pools, 1, rng)
        return picks

    @functools.cached_property
    def _class_pools(self) -> tuple[dict[int, list[int]], list[int]]:
        # built once: a draw must not scan every training slice (10^5 of them on a large dataset)
        real = self.slices[: len(self.slices) - self.synthetic]
        return class_pools([s.classes for s in real], self.classes)

    @functools.cached_property
    def _synthetic_pools(self) -> tuple[dict[int, list[int]], list[int]] | None:
        """``class_pools`` of the synthetic slices, as indices into all training slices; None if none holds a target."""
        start = len(self.slices) - self.synthetic
        found = [s.classes for s in self.slices[start:]]
        if not any(set(self.classes) & set(c) for c in found):
            return None
        holding, empty = class_pools(found, self.classes)
        return {c: [start + i for i in pool] for c, pool in holding.items()}, [start + i for i in empty]

    @functools.cached_property
    def _stack_starts(self) -> list[int]:
        """Start indices of the runs of ``depth`` consecutive slices of one case whose middle holds a target (3D
        training), found once."""
        slices, depth = self.slices, self.depth
        return [
            i
            for i in range(len(slices) - depth + 1)
            if len({s.case for s in slices[i : i + depth]}) == 1
            and [s.index for s in slices[i : i + depth]] == list(range(slices[i].index, slices[i].index + depth))
            and set(self.classes) & set(slices[i + depth // 2].classes)
        ]

    def _pick_stacks(self, count: int, depth: int, rng: np.random.Generator) -> list[int]:
        """Start indices of ``count`` runs of ``depth`` consecutive slices of one case (3D training)."""
        starts = self._stack_starts
        if not starts:
            raise TrainingError(
                f"no run of {depth} consecutive labelled slices holding the target: lower train.depth_slices"
            )
        picks = []
        for _ in range(count):
            start = starts[int(rng.integers(len(starts)))]
            picks.extend(range(start, start + depth))
        return picks


def balanced_picks(
    slice_classes: Sequence[Sequence[int]],
    classes: Sequence[int],
    count: int,
    rng: np.random.Generator,
    empty_share: float = 0.25,
) -> list[int]:
    """``count`` slice indices drawn class-balanced: with probability ``empty_share`` (when such slices exist) a
    slice holding none of ``classes``; otherwise a class uniformly among the learned classes that some slice holds,
    then uniformly a slice holding it. A class present in one slice out of a hundred is drawn as often as one present
    in all of them (uniform slice draws would almost never show it, and a few labelled slices with many small classes
    then settle on the classes they see most, or on background alone).

    Args:
        slice_classes: the classes present in each training slice.
        classes: the learned class ids.
    """
    return draw_balanced(class_pools(slice_classes, classes), count, rng, empty_share)


def class_pools(
    slice_classes: Sequence[Sequence[int]], classes: Sequence[int]
) -> tuple[dict[int, list[int]], list[int]]:
    """For ``balanced_picks``: the slices holding each learned class, and the slices holding none.

    Raises:
        TrainingError: no slice holds any of ``classes``.
    """
    wanted = set(classes)
    holding: dict[int, list[int]] = {}
    empty = []
    for i, present in enumerate(slice_classes):
        mine = wanted & set(present)
        if not mine:
            empty.append(i)
        for c in mine:
            holding.setdefault(c, []).append(i)
    if not holding:
        raise TrainingError(f"no training slice contains any of the requested classes {sorted(wanted)}")
    return holding, empty


def draw_balanced(
    pools: tuple[dict[int, list[int]], list[int]], count: int, rng: np.random.Generator, empty_share: float = 0.25
) -> list[int]:
    """``count`` draws from ``class_pools``: an empty slice with probability ``empty_share``, else a class, then a
    slice holding it."""
    holding, empty = pools
    order = sorted(holding)
    picks = []
    for _ in range(count):
        if empty and rng.random() < empty_share:
            picks.append(int(empty[int(rng.integers(len(empty)))]))
            continue
        pool = holding[order[int(rng.integers(len(order)))]]
        picks.append(int(pool[int(rng.integers(len(pool)))]))
    return picks
