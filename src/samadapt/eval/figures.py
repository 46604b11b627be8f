"""Pictures: overlays of ground truth and predictions with their prompts, grids of them, and training loss curves.

Figures are drawn on matplotlib's Agg canvas directly (``matplotlib.figure.Figure``, no pyplot), so nothing needs a
display and the global backend of the calling program is left alone; files are written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from samadapt.eval.results import read_log_rows
from samadapt.files import atomic_write

GT_COLOUR = "#00e5ff"  # ground-truth contours, every class
POSITIVE, NEGATIVE, BOX_COLOUR = "#30d158", "#ff3b30", "#ffd60a"
PRED_COLOURS = ("#ff2d95", "#ff9f0a", "#bf5af2", "#0a84ff", "#ac8e68", "#ffffff")  # per predicted class


@dataclass
class OverlayItem:
    """One panel of ``save_overlay_grid``; the fields are the arguments of ``save_overlay``."""

    image: np.ndarray
    gt: np.ndarray
    pred: np.ndarray | Mapping[int, np.ndarray]
    title: str = ""
    points: object = None
    boxes: object = None
    point_labels: object = None


def _display_image(image: np.ndarray) -> tuple[np.ndarray, dict]:
    """Image scaled to [0, 1] for display: grey (H, W) windowed at the 0.5 / 99.5 percentiles, or RGB (H, W, 3)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        low, high = float(image.min()), float(image.max())
        return np.clip((image[..., :3] - low) / max(high - low, 1e-6), 0, 1), {}
    if image.ndim != 2:
        raise ValueError(f"image must be (H, W) or (H, W, 3), got shape {image.shape}")
    low, high = np.percentile(image, (0.5, 99.5)) if image.size else (0.0, 1.0)
    return image, {"cmap": "gray", "vmin": float(low), "vmax": float(max(high, low + 1e-6))}


def _class_masks(gt: np.ndarray, pred) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(class id, GT mask, predicted mask) per class: from a {class id: mask} dict, or from two label maps."""
    gt = np.asarray(gt)
    if isinstance(pred, Mapping):
        return [(int(c), gt == c, np.asarray(m, bool)) for c, m in sorted(pred.items())]
    pred = np.asarray(pred)
    if gt.dtype == bool or pred.dtype == bool:
        return [(1, gt.astype(bool), pred.astype(bool))]
    labels = sorted((set(np.unique(gt).tolist()) | set(np.unique(pred).tolist())) - {0})
    return [(c, gt == c, pred == c) for c in labels]


def _prompt_marks(points, point_labels, boxes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 2) xy points, (N,) labels and (M, 4) XYXY boxes, from arrays or from ``SliceResult.prompts`` pairs."""
    box_list = [np.asarray(boxes, float).reshape(-1, 4)] if boxes is not None else []
    first = points[0] if points is not None and not isinstance(points, np.ndarray) and len(points) else None
    if isinstance(first, tuple) and len(first) == 2 and isinstance(first[0], str):
        records, points, point_labels = points, [], []
        for kind, value in records:  # ("point", click with .x .y .positive) or ("box", XYXY)
            if kind == "point":
                points.append((value.x, value.y))
                point_labels.append(int(value.positive))
            elif kind == "box" and value is not None:
                box_list.append(np.asarray(value, float).reshape(-1, 4))
    elif hasattr(first, "x") and hasattr(first, "y"):  # samadapt.prompts.Click (a 3-tuple: never read as (x, y))
        if point_labels is None:
            point_labels = [int(getattr(c, "positive", True)) for c in points]
        points = [(c.x, c.y) for c in points]
    xy = np.asarray(points if points is not None else [], float).reshape(-1, 2)
    labels = np.ones(len(xy), int) if point_labels is None else np.asarray(point_labels, int).reshape(-1)
    if len(labels) != len(xy):
        raise ValueError(f"{len(xy)} points but {len(labels)} point labels")
    return xy, labels, np.concatenate(box_list) if box_list else np.zeros((0, 4))


def _draw_overlay(ax, item: OverlayItem, class_names: Mapping[int, str] | None = None, legend: bool = True) -> None:
    shown, style = _display_image(item.image)
    height, width = shown.shape[:2]
    ax.imshow(shown, interpolation="nearest", **style)
    handles = [Line2D([], [], color=GT_COLOUR, lw=1.5, label="ground truth")]
    # contours on a zero-padded grid of pixel centres, so objects touching the border are closed
    ys, xs = np.arange(-1, height + 1), np.arange(-1, width + 1)
    for k, (class_id, gt_mask, pred_mask) in enumerate(_class_masks(item.gt, item.pred)):
        if gt_mask.shape != (height, width) or pred_mask.shape != (height, width):
            raise ValueError(f"masks {gt_mask.shape} / {pred_mask.shape} do not match the image {(height, width)}")
        colour = PRED_COLOURS[k % len(PRED_COLOURS)]
        if pred_mask.any():
            fill = np.zeros((height, width, 4), np.float32)
            fill[pred_mask] = (*_rgb(colour), 0.35)  # exact pixels, not an interpolated contourf
            ax.imshow(fill, interpolation="nearest")
            ax.contour(xs, ys, np.pad(pred_mask, 1).astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.0)
        if gt_mask.any():
            ax.contour(xs, ys, np.pad(gt_mask, 1).astype(np.float32), levels=[0.5], colors=[GT_COLOUR], linewidths=1.5)
        name = (class_names or {}).get(class_id, f"class {class_id}")
        handles.append(Patch(facecolor=colour, alpha=0.6, label=f"prediction: {name}"))
    xy, labels, xyxy = _prompt_marks(item.points, item.point_labels, item.boxes)
    for (x, y), label in zip(xy, labels, strict=True):
        if label in (0, 1):  # -1 is padding
            colour = POSITIVE if label == 1 else NEGATIVE
            ax.plot(x, y, marker="*", markersize=12, color=colour, markeredgecolor="black", markeredgewidth=0.8)
    for x0, y0, x1, y1 in xyxy:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=BOX_COLOUR, linewidth=1.5))
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_axis_off()
    if legend:
        ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.6)


def _rgb(colour: str) -> tuple[float, float, float]:
    return tuple(int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))


def _new_figure(width_px: int, height_px: int, dpi: int = 100) -> Figure:
    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def save_overlay(
    image_2d: np.ndarray,
    gt_2d: np.ndarray,
    pred_2d: np.ndarray | Mapping[int, np.ndarray],
    path: str | Path,
    title: str = "",
    points=None,
    boxes=None,
    *,
    point_labels=None,
    class_names: Mapping[int, str] | None = None,
    zoom: int | None = None,
) -> Path:
    """Save a PNG of one slice with ground truth, prediction and prompts.

    Args:
        image_2d: (H, W) grey image (shown windowed at its 0.5 / 99.5 percentiles) or (H, W, 3) RGB.
        gt_2d: (H, W) binary mask or integer label map: contours in ``GT_COLOUR``.
        pred_2d: (H, W) binary mask or label map, or {class id: (H, W) mask} (then GT is ``gt_2d == class id``):
            filled and outlined in one colour per class (``PRED_COLOURS``).
        path: the PNG to write.
        title: written in the top-left corner.
        points: (N, 2) pixel coordinates (x, y) = (column, row); or ``samadapt.prompts.Click``s; or the ``prompts``
            list of an evaluation ``SliceResult`` (("point", click) / ("box", XYXY) pairs).
        boxes: (M, 4) or (4,) XYXY boxes in pixels, drawn in ``BOX_COLOUR``.
        point_labels: (N,) 1 positive (green star), 0 negative (red star), -1 padding (not drawn); default positive.
        class_names: class id -> name for the legend.
        zoom: integer magnification; default: the smallest that makes the longer side at least 512 pixels.

    Returns:
        ``path``; the PNG is exactly (H * zoom) x (W * zoom) pixels.

    Raises:
        ValueError: shapes disagree, or the number of point labels differs from the number of points.
    """
    path = Path(path)
    height, width = np.asarray(image_2d).shape[:2]
    zoom = zoom or max(1, math.ceil(512 / max(height, width)))
    figure = _new_figure(width * zoom, height * zoom)
    ax = figure.add_axes((0, 0, 1, 1))
    _draw_overlay(ax, OverlayItem(image_2d, gt_2d, pred_2d, title, points, boxes, point_labels), class_names)
    if title:
        box = {"facecolor": "black", "alpha": 0.6, "edgecolor": "none", "pad": 2}
        ax.text(0.01, 0.99, title, transform=ax.transAxes, va="top", ha="left", fontsize=9, color="white", bbox=box)
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=figure.dpi))
    return path


def save_overlay_grid(
    items: Sequence[OverlayItem | Mapping],
    path: str | Path,
    columns: int = 4,
    panel_px: int = 320,
    class_names: Mapping[int, str] | None = None,
) -> Path:
    """Save several overlays (e.g. best / median / worst slices) as one PNG grid, each panel titled above.

    Args:
        items: ``OverlayItem``s, or mappings with its field names (``image``, ``gt``, ``pred``, ``title``, ...).
        columns: panels per row (fewer if there are fewer items).
        panel_px: width of each panel in pixels; the height follows the first image's aspect ratio, so the PNG is
            (columns * panel_px) wide. The legend is drawn in the first panel.

    Raises:
        ValueError: no items, or an item as ``save_overlay`` would reject it.
    """
    items = [item if isinstance(item, OverlayItem) else OverlayItem(**item) for item in items]
    if not items:
        raise ValueError("save_overlay_grid needs at least one item")
    columns = min(columns, len(items))
    rows = math.ceil(len(items) / columns)
    height, width = np.asarray(items[0].image).shape[:2]
    panel_w, panel_h, title_h = panel_px, max(1, round(panel_px * height / width)), 24  # panels take item 0's aspect
    cell_h = panel_h + title_h
    figure = _new_figure(columns * panel_w, rows * cell_h)
    for k, item in enumerate(items):
        row, col = divmod(k, columns)
        bottom = 1 - ((row + 1) * cell_h) / (rows * cell_h)  # axes in figure fractions, title band above each
        ax = figure.add_axes((col / columns, bottom, 1 / columns, panel_h / (rows * cell_h)))
        _draw_overlay(ax, item, class_names, legend=k == 0)
        ax.set_title(item.title, fontsize=8, pad=3)
    return atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=figure.dpi))


def save_loss_curve(csv_or_rows: str | Path | Sequence[Mapping], path: str | Path) -> Path:
    """Plot training loss (with the learning rate on a second axis) and validation Dice against the step.

    Args:
        csv_or_rows: the trainer's ``metrics.csv`` or its rows: dicts with ``step``, ``loss``, optionally ``lr`` and
            ``val_dice`` (present only on validation steps; missing, empty or NaN elsewhere).
        path: the PNG to write (800 x 600 pixels with validation Dice, 800 x 360 without).

    Raises:
        ValueError: no row has a finite ``step`` and ``loss``.
    """
    rows = [r for r in read_log_rows(csv_or_rows) if math.isfinite(r.get("step", math.nan))]
    train = np.array([(r["step"], r.get("loss", math.nan), r.get("lr", math.nan)) for r in rows]).reshape(-1, 3)
    train = train[np.isfinite(train[:, 1])]
    if not len(train):
        raise ValueError("no rows with a step and a loss to plot")
    val = np.array([(r["step"], r.get("val_dice", math.nan)) for r in rows]).reshape(-1, 2)
    val = val[np.isfinite(val[:, 1])]
    figure = _new_figure(800, 600 if len(val) else 360)
    axes = figure.subplots(2 if len(val) else 1, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].plot(train[:, 0], train[:, 1], color="#0a84ff", lw=1.0, label="training loss")
    axes[0].set_ylabel("loss")
    axes[0].grid(alpha=0.3)
    if np.isfinite(train[:, 2]).any():
        # the schedule beside the loss: a scheduler that never steps shows up as a flat line
        lr_axis = axes[0].twinx()
        lr_axis.plot(train[:, 0], train[:, 2], color="#8e8e93", lw=1.0, ls="--", label="learning rate")
        lr_axis.set_ylabel("learning rate", color="#8e8e93")
    if len(val):
        axes[1].plot(val[:, 0], val[:, 1], color="#30d158", marker="o", ms=4, label="validation Dice")
        axes[1].set_ylabel("validation Dice")
        axes[1].set_ylim(0, 1)
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[0].set_title("training loss" + (" and validation Dice" if len(val) else ""))
    figure.tight_layout()
    return atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=figure.dpi))


def save_interactive_curve(curves: Mapping[str, Sequence[float]], path: str | Path, metric: str = "Dice") -> Path:
    """Plot each model's mean ``metric`` against the interaction step (0: the box, then one click per step).

    Args:
        curves: model name -> the metric at steps 0..N (``eval.interactive.summarise``'s ``dice_steps``).
        path: the PNG to write (640 x 400 pixels).
    """
    figure = _new_figure(640, 400)
    axis = figure.subplots()
    colours = ("#0a84ff", "#8e8e93", "#30d158", "#ff9f0a")
    for (name, values), colour in zip(curves.items(), colours * len(curves), strict=False):
        axis.plot(range(len(values)), values, color=colour, marker="o", ms=4, lw=1.5, label=name)
    steps = max((len(v) for v in curves.values()), default=1)
    axis.set_xticks(range(steps), ["box", *[str(k) for k in range(1, steps)]])
    axis.set_xlabel("corrective clicks after the box")
    axis.set_ylabel(f"mean {metric}")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    axis.set_title(f"{metric} after each interaction")
    figure.tight_layout()
    return atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=figure.dpi))
