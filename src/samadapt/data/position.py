"""Where a slice lies along its volume's slicing axis: the one definition training, evaluation and prediction share.

Read by semantic runs trained with ``model.slice_position`` (``models.mask_decoder.SlicePrior``).
"""

from __future__ import annotations


def slice_position(index: int, count: int) -> float:
    """Slice ``index`` of ``count`` along the axis as a number in [0, 1]: index / (count - 1), so the first slice
    is 0 and the last 1 whatever the volume's depth. A single slice (a 2D image) is 0.5: it has no axis to lie
    along, and the middle is the value furthest from both ends a model learnt from.

    Raises:
        ValueError: ``index`` outside 0..count - 1.
    """
    if not 0 <= index < count:
        raise ValueError(f"slice {index} is outside a volume of {count} slices")
    if count == 1:
        return 0.5
    return index / (count - 1)
