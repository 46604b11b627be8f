"""Masks <-> planar polygons, exactly: contours along pixel edges, filled back by the even-odd rule at pixel centres.

An RT Structure Set stores regions as closed planar polygons. Tracing the boundary between foreground and background
pixels (not through pixel centres, as marching squares does) gives polygons whose even-odd interior holds exactly the
foreground pixel centres: a hole is a second polygon inside the first, two pixels touching at a corner are two
polygons. So a mask written as contours and rasterised back is the same mask, and the polygons' area is its pixel
count. Coordinates are (x, y) in pixel units, pixel (r, c) centred at (c, r).
"""

from __future__ import annotations

import numpy as np

# moving along a boundary edge (dx, dy), foreground on the right-hand side in image coordinates (y down)
_RIGHT_TURN = {(1, 0): (0, 1), (0, 1): (-1, 0), (-1, 0): (0, -1), (0, -1): (1, 0)}


def mask_to_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """The closed polygons (each (N, 2) float, (x, y), not repeating the first vertex) bounding a 2D mask.

    Vertices lie on pixel corners (half-integers); collinear vertices are dropped. Outer boundaries run one way,
    holes the other; for even-odd filling only the edges matter.
    """
    mask = np.pad(np.asarray(mask, bool), 1)
    # corner (i, j) of the padded grid is the point x = j - 1.5, y = i - 1.5 of the original pixel grid
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(starts: np.ndarray, step: tuple[int, int]) -> None:
        for i, j in starts:
            outgoing.setdefault((int(i), int(j)), []).append(step)

    vertical = mask[1:, :] != mask[:-1, :]  # edges between pixel rows i and i + 1: along corner row i + 1
    rows, cols = np.nonzero(vertical)
    below = mask[1:, :][rows, cols]
    add(np.stack([rows[below] + 1, cols[below]], 1), (1, 0))  # foreground below: walk east
    add(np.stack([rows[~below] + 1, cols[~below] + 1], 1), (-1, 0))  # foreground above: walk west
    horizontal = mask[:, 1:] != mask[:, :-1]  # edges between pixel columns j and j + 1: along corner column j + 1
    rows, cols = np.nonzero(horizontal)
    right = mask[:, 1:][rows, cols]
    add(np.stack([rows[right] + 1, cols[right] + 1], 1), (0, -1))  # foreground east of it: walk north
    add(np.stack([rows[~right], cols[~right] + 1], 1), (0, 1))  # foreground west of it: walk south
    polygons = []
    while outgoing:
        start = point = next(iter(outgoing))
        step: tuple[int, int] | None = None
        loop = []
        while True:
            steps = outgoing[point]
            # at a corner shared by two diagonal pixels turn right: each pixel gets its own loop
            turn = _RIGHT_TURN[step] if step is not None else None
            chosen = turn if turn in steps else steps[0]
            steps.remove(chosen)
            if not steps:
                del outgoing[point]
            if chosen != step:
                loop.append(point)
            step = chosen
            point = (point[0] + step[1], point[1] + step[0])
            if point == start:
                break
        polygons.append(np.array([(j - 1.5, i - 1.5) for i, j in _drop_collinear(loop)], float))
    return polygons


def _drop_collinear(loop: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Remove vertices where the path goes straight on (the start vertex included)."""
    points = np.array(loop)
    before = points - np.roll(points, 1, axis=0)
    after = np.roll(points, -1, axis=0) - points
    turning = (before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) != 0
    return [loop[k] for k in np.nonzero(turning)[0]]


def polygons_to_mask(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Fill polygons ((N, 2) (x, y) in pixel units) at the pixel centres of an (H, W) grid by the even-odd rule.

    Each row's centre line y = r is crossed by the polygon edges; the crossings of all polygons, sorted, pair up into
    the filled spans (so a polygon inside another is a hole). A centre exactly on an edge counts as inside for
    crossings at x <= centre (the half-open convention).
    """
    height, width = shape
    parity = np.zeros(shape, np.int64)
    columns = np.arange(width)
    for polygon in polygons:
        polygon = np.asarray(polygon, float)
        if len(polygon) < 3:
            continue
        start, end = polygon, np.roll(polygon, -1, axis=0)
        low, high = np.minimum(start[:, 1], end[:, 1]), np.maximum(start[:, 1], end[:, 1])
        for r in range(max(0, int(np.floor(low.min()))), min(height, int(np.ceil(high.max())) + 1)):
            crossing = (low <= r) & (r < high)  # half-open in y: a vertex on the line counts once
            if not crossing.any():
                continue
            a, b = start[crossing], end[crossing]
            x = a[:, 0] + (r - a[:, 1]) * (b[:, 0] - a[:, 0]) / (b[:, 1] - a[:, 1])
            # every crossing at or left of a centre flips it
            parity[r] += (x[None, :] <= columns[:, None]).sum(axis=1)
    return (parity % 2).astype(bool)
