"""Reports: metrics files, overlay pictures, loss curves, and a Markdown + self-contained HTML page.

- ``write_metrics_files``: ``metrics.json`` (strict JSON: NaN and inf written as ``null``) and ``metrics.csv`` (one row
  per case and class; NaN written as an empty cell).
- ``save_overlay`` / ``save_overlay_grid`` / ``save_loss_curve``: PNG pictures. Figures are drawn on matplotlib's Agg
  canvas directly (``matplotlib.figure.Figure``, no pyplot), so nothing needs a display and the global backend of the
  calling program is left alone.
- ``write_comparison_report``: ``report.md`` and ``report.html`` from a list of sections (``TextSection``,
  ``TableSection``, ``ImageSection``); the HTML embeds its pictures as base64 data URIs and its CSS inline, and both
  end with the metric definitions and empty-mask conventions of ``samadapt.eval.metrics``.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import mimetypes
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from samadapt.eval.metrics import EMPTY_MASK_CONVENTIONS, METRIC_DEFINITIONS, dice

GT_COLOUR = "#00e5ff"  # ground-truth contours, every class
PRED_COLOURS = ("#ff2d95", "#ff9f0a", "#bf5af2", "#0a84ff", "#ac8e68", "#ffffff")  # per predicted class
POSITIVE, NEGATIVE, BOX_COLOUR = "#30d158", "#ff3b30", "#ffd60a"
_ROW_KEYS = ("model", "case", "slice", "class")  # leading metrics.csv columns, when present

# -- files --------------------------------------------------------------------------------------------------------


def to_jsonable(value: object) -> object:
    """A copy of ``value`` for strict JSON: NaN / inf -> None, numpy -> Python, paths -> str, tuples -> lists."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data: Mapping) -> Path:
    """Write ``data`` as indented strict JSON (``allow_nan=False`` after ``to_jsonable``)."""
    path = Path(path)
    path.write_text(json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _csv_cell(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value.item() if isinstance(value, np.generic) else value


def write_csv(path: str | Path, rows: Sequence[Mapping]) -> Path:
    """One CSV line per row; columns are the union of keys (``model, case, slice, class`` first), NaN -> empty."""
    path = Path(path)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    columns = [k for k in _ROW_KEYS if k in keys] + [k for k in keys if k not in _ROW_KEYS]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows({k: _csv_cell(v) for k, v in row.items()} for row in rows)
    return path


def write_metrics_files(out_dir: str | Path, metrics: Mapping, per_case_rows: Sequence[Mapping]) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``metrics.csv`` into ``out_dir`` (created if needed).

    Args:
        metrics: at least ``mean_dice`` (float), ``per_class`` ({name: {"dice", "hd95_mm", ...}}) and ``prompt`` (the
            prompt protocol, e.g. ``"box"`` or ``"none"``); ``cases`` defaults to the number of distinct ``case``
            values in the rows, and the empty-mask conventions are added. Other keys are written as given.
        per_case_rows: one mapping per case (or slice) and class, e.g. ``MetricAccumulator.rows``.

    Returns:
        The paths of ``metrics.json`` and ``metrics.csv``.

    Raises:
        ValueError: a required key is missing, or a class lacks ``dice`` / ``hd95_mm``.
    """
    missing = [k for k in ("mean_dice", "per_class", "prompt") if k not in metrics]
    if missing:
        raise ValueError(f"metrics lacks {missing}: metrics.json always states them")
    for name, values in metrics["per_class"].items():
        if "dice" not in values or "hd95_mm" not in values:
            raise ValueError(f"per_class[{name!r}] needs 'dice' and 'hd95_mm', has {sorted(values)}")
    document = dict(metrics)
    document["prompt"] = str(document["prompt"])
    document.setdefault("cases", len({r["case"] for r in per_case_rows if "case" in r}))
    document.setdefault("empty_mask_conventions", EMPTY_MASK_CONVENTIONS)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_json(out_dir / "metrics.json", document), write_csv(out_dir / "metrics.csv", per_case_rows)


# -- pictures -----------------------------------------------------------------------------------------------------


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
    figure.savefig(path, dpi=figure.dpi)
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
    figure.savefig(Path(path), dpi=figure.dpi)
    return Path(path)


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan  # empty CSV cell, None or missing


def read_log_rows(csv_or_rows: str | Path | Sequence[Mapping]) -> list[dict]:
    """Training log rows (``step``, ``loss``, ``lr``, ``val_dice``...) as floats, NaN where missing or empty."""
    if isinstance(csv_or_rows, (str, Path)):
        with Path(csv_or_rows).open(newline="", encoding="utf-8") as handle:
            csv_or_rows = list(csv.DictReader(handle))
    return [{k: _float(v) for k, v in row.items()} for row in csv_or_rows]


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
    figure.savefig(Path(path), dpi=figure.dpi)
    return Path(path)


# -- report -------------------------------------------------------------------------------------------------------


@dataclass
class TextSection:
    """Paragraphs separated by blank lines; lines starting with ``- `` are list items."""

    title: str
    text: str


@dataclass
class TableSection:
    """A table: ``rows`` are mappings (keyed by ``columns``) or sequences (in column order).

    ``formats`` maps a column to a format spec (default ``.3f`` for floats); ``better`` maps a column to ``"higher"``
    or ``"lower"`` so the HTML colours positive / negative values green / red (for difference columns).
    """

    title: str
    columns: list[str]
    rows: list[Mapping | Sequence]
    note: str = ""
    formats: dict[str, str] = field(default_factory=dict)
    better: dict[str, str] = field(default_factory=dict)


@dataclass
class ImageSection:
    """Pictures (PNG / JPEG / SVG files) with one caption each (or none)."""

    title: str
    paths: list[str | Path]
    captions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.captions and len(self.captions) != len(self.paths):
            raise ValueError(f"{len(self.paths)} images but {len(self.captions)} captions")


@dataclass
class Section:
    """Text, a table and pictures under one title (older form; expands into the three sections above)."""

    title: str
    text: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[Sequence] = field(default_factory=list)
    images: list[tuple[str | Path, str]] = field(default_factory=list)

    def expand(self) -> list[TextSection | TableSection | ImageSection]:
        parts: list = [TextSection(self.title, self.text)]
        if self.columns:
            parts.append(TableSection("", list(self.columns), list(self.rows)))
        if self.images:
            parts.append(ImageSection("", [p for p, _ in self.images], [c for _, c in self.images]))
        return parts


def _format_cell(value, spec: str | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return format(value, spec or ".3f")
    return str(value)


def _cells(table: TableSection) -> list[list[tuple[str, object]]]:
    """(text, raw value) per cell, in column order."""
    out = []
    for row in table.rows:
        values = [row.get(c) for c in table.columns] if isinstance(row, Mapping) else list(row)
        if len(values) != len(table.columns):
            raise ValueError(f"row {row!r} has {len(values)} cells for {len(table.columns)} columns")
        out.append([(_format_cell(v, table.formats.get(c)), v) for c, v in zip(table.columns, values, strict=True)])
    return out


def markdown_table(rows: Sequence[Mapping | Sequence], columns: Sequence[str], formats: Mapping | None = None) -> str:
    """A GitHub Markdown table; floats as ``.3f`` unless ``formats`` says otherwise, NaN / None as ``n/a``."""
    table = TableSection("", list(columns), list(rows), formats=dict(formats or {}))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for cells in _cells(table):
        lines.append("| " + " | ".join(text.replace("|", "\\|") for text, _ in cells) + " |")
    return "\n".join(lines)


def comparison_section(
    adapted: Mapping,
    baseline: Mapping | None,
    title: str = "Adapted vs baseline",
    adapted_name: str = "adapted",
    baseline_name: str = "baseline",
) -> TableSection:
    """Per-class Dice and HD95 (mm) of an adapted model beside its baseline, with the differences (adapted - baseline).

    Args:
        adapted, baseline: ``aggregate`` results (``per_class``, ``mean_dice``, ``mean_hd95_mm``); baseline may be
            None (then only the adapted columns).
    """
    d, h = "Dice", "HD95 (mm)"
    columns = ["class", f"{d} {adapted_name}"]
    if baseline is not None:
        columns += [f"{d} {baseline_name}", f"{d} change"]
    columns += [f"{h} {adapted_name}"]
    if baseline is not None:
        columns += [f"{h} {baseline_name}", f"{h} change"]
    columns.append("cases")

    def row(name: str, ours: Mapping, theirs: Mapping | None, cases) -> dict:
        out = {"class": name, f"{d} {adapted_name}": ours.get("dice"), f"{h} {adapted_name}": ours.get("hd95_mm")}
        if theirs is not None:
            for label, key in ((d, "dice"), (h, "hd95_mm")):
                a, b = _float(ours.get(key)), _float(theirs.get(key))
                out[f"{label} {baseline_name}"] = b
                out[f"{label} change"] = a - b  # NaN if either is NaN
        return {**out, "cases": cases}

    baseline_classes = baseline["per_class"] if baseline is not None else {}
    rows = [
        row(name, values, baseline_classes.get(name, {}) if baseline is not None else None, values.get("cases"))
        for name, values in adapted["per_class"].items()
    ]
    mean = {"dice": adapted.get("mean_dice"), "hd95_mm": adapted.get("mean_hd95_mm")}
    base_mean = None
    if baseline is not None:
        base_mean = {"dice": baseline.get("mean_dice"), "hd95_mm": baseline.get("mean_hd95_mm")}
    rows.append(row("mean over classes", mean, base_mean, adapted.get("cases")))
    formats = {c: ".2f" for c in columns if c.startswith(h)}
    formats[f"{d} change"] = "+.3f"
    formats[f"{h} change"] = "+.2f"
    better = {f"{d} change": "higher", f"{h} change": "lower"} if baseline is not None else {}
    return TableSection(title, columns, rows, formats=formats, better=better)


def _escape(text: str) -> str:
    return html.escape(text, quote=False)  # text nodes; attribute values use html.escape with quotes


def _paragraphs_html(text: str) -> str:
    parts = []
    for block in text.strip().split("\n\n"):
        lines = [line for line in block.splitlines() if line.strip()]
        if lines and all(line.lstrip().startswith("- ") for line in lines):
            items = "".join(f"<li>{_escape(line.lstrip()[2:])}</li>" for line in lines)
            parts.append(f"<ul>{items}</ul>")
        elif lines:
            parts.append(f"<p>{_escape(' '.join(lines))}</p>")
    return "".join(parts)


def _table_html(table: TableSection) -> str:
    head = "".join(f"<th>{_escape(c)}</th>" for c in table.columns)
    body = []
    for cells in _cells(table):
        tds = []
        for column, (text, raw) in zip(table.columns, cells, strict=True):
            sign = np.sign(_float(raw)) if column in table.better and isinstance(raw, (int, float)) else 0
            good = sign > 0 if table.better.get(column) == "higher" else sign < 0
            css = "" if not sign or not math.isfinite(sign) else (' class="good"' if good else ' class="bad"')
            tds.append(f"<td{css}>{_escape(text)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    note = f'<p class="note">{_escape(table.note)}</p>' if table.note else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{note}"


def _data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _markdown_image_path(path: Path, out_dir: Path) -> str:
    """The image's path relative to the report; images outside ``out_dir`` are copied into ``out_dir/images``."""
    try:
        return path.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        copy = out_dir / "images" / path.name
        copy.parent.mkdir(exist_ok=True)
        if not copy.exists() or copy.resolve() != path.resolve():
            shutil.copyfile(path, copy)
        return copy.relative_to(out_dir).as_posix()


_CSS = (
    "body{font-family:system-ui,-apple-system,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
    "h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}"
    "table{border-collapse:collapse;margin:.8em 0;font-size:.92em}"
    "th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}th{background:#f3f3f3}"
    "td:first-child,th:first-child{text-align:left}td.good{color:#1a7f37;font-weight:600}"
    "td.bad{color:#c62828;font-weight:600}.note{font-size:.85em;color:#555}"
    ".figures{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;max-width:360px}"
    "figure img{width:100%;border:1px solid #ddd}figcaption{font-size:.8em;text-align:center;color:#444}"
    ".conventions{background:#f7f7f7;padding:.6em 1em;border-left:4px solid #999}"
)


def write_comparison_report(
    out_dir: str | Path,
    title: str,
    sections: Sequence[TextSection | TableSection | ImageSection | Section],
    conventions: str | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md`` (pictures by relative path) and a self-contained ``report.html`` (pictures embedded).

    Both end with a "Metric conventions" section: ``METRIC_DEFINITIONS`` and ``EMPTY_MASK_CONVENTIONS`` (or
    ``conventions`` if given, e.g. with the NSD tolerance), so every report states how empty masks were scored.

    Args:
        out_dir: created if needed.
        title: page title.
        sections: in order; build adapted-vs-baseline tables with ``comparison_section``.

    Returns:
        The paths of ``report.md`` and ``report.html``.

    Raises:
        FileNotFoundError: an image does not exist.
        TypeError: an unknown section type.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [p for s in sections for p in (s.expand() if isinstance(s, Section) else [s])]
    parts.append(TextSection("Metric conventions", conventions or f"{METRIC_DEFINITIONS}\n\n{EMPTY_MASK_CONVENTIONS}"))
    md, body = [f"# {title}", ""], [f"<h1>{_escape(title)}</h1>"]
    for part in parts:
        if part.title:
            md += [f"## {part.title}", ""]
            body.append(f"<h2>{_escape(part.title)}</h2>")
        if isinstance(part, TextSection):
            if part.text:
                md += [part.text.strip(), ""]
                css = ' class="conventions"' if part.title == "Metric conventions" else ""
                body.append(f"<div{css}>{_paragraphs_html(part.text)}</div>")
        elif isinstance(part, TableSection):
            md += [markdown_table(part.rows, part.columns, part.formats), ""]
            md += [f"_{part.note}_", ""] if part.note else []
            body.append(_table_html(part))
        elif isinstance(part, ImageSection):
            captions = part.captions or [""] * len(part.paths)
            figures = []
            for image, caption in zip(map(Path, part.paths), captions, strict=True):
                if not image.is_file():
                    raise FileNotFoundError(f"report image {image} does not exist")
                md.append(f"![{caption}]({_markdown_image_path(image, out_dir)})" + (f" {caption}" if caption else ""))
                figures.append(
                    f'<figure><img src="{_data_uri(image)}" alt="{html.escape(caption)}">'
                    f"<figcaption>{_escape(caption)}</figcaption></figure>"
                )
            md.append("")
            body.append(f'<div class="figures">{"".join(figures)}</div>')
        else:
            raise TypeError(f"unknown report section {type(part).__name__}")
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text("\n".join(md), encoding="utf-8")
    html_path.write_text(page, encoding="utf-8")
    return md_path, html_path


def write_report(out_dir: str | Path, title: str, sections: Sequence) -> tuple[Path, Path]:
    """Same as ``write_comparison_report`` (older name)."""
    return write_comparison_report(out_dir, title, sections)


# -- one evaluation (or two: adapted and baseline) as files -------------------------------------------------------


def _slice_dice(result, class_id: int) -> float:
    return dice(result.pred[class_id], np.asarray(result.gt) == class_id)


def save_evaluation(out_dir: str | Path, evaluation, baseline=None, title: str | None = None) -> dict:
    """metrics.json / metrics.csv (both models' rows), best / median / worst overlays, report.md / report.html.

    ``evaluation`` and ``baseline`` are ``samadapt.eval.evaluate.Evaluation`` objects (``metrics_json()``, ``rows``,
    ``summary``, ``slices``, ``model``, ``protocol``). Returns the content of metrics.json (before NaN -> null).
    """
    out_dir = Path(out_dir)
    metrics = evaluation.metrics_json()
    if baseline is not None:
        metrics["baseline"] = baseline.metrics_json()
    rows = [{"model": evaluation.model, **r} for r in evaluation.rows]
    rows += [{"model": f"baseline {baseline.model}", **r} for r in baseline.rows] if baseline is not None else []
    write_metrics_files(out_dir, metrics, rows)
    paths, captions = [], []
    for class_id in sorted({c for r in evaluation.slices for c in r.pred})[:3]:
        scored = [(_slice_dice(r, class_id), r) for r in evaluation.slices if (np.asarray(r.gt) == class_id).any()]
        scored = sorted(((d, r) for d, r in scored if not math.isnan(d)), key=lambda pair: pair[0])
        picks = {"worst": 0, "median": len(scored) // 2, "best": len(scored) - 1} if scored else {}
        for label, index in picks.items():
            score, result = scored[index]
            path = out_dir / f"overlay_class{class_id}_{label}.png"
            caption = f"class {class_id} {label}: {result.case} slice {result.slice}, Dice {score:.3f}"
            save_overlay(result.image, result.gt, {class_id: result.pred[class_id]}, path, caption, result.prompts)
            paths.append(path)
            captions.append(caption)
    text = f"Model {evaluation.model}, prompts {evaluation.protocol}, {metrics.get('units', '?')} units from "
    text += f"{metrics.get('cases', '?')} cases."
    if baseline is not None:
        text += f" Baseline: {baseline.model} with the same prompts ({baseline.protocol}, same seed)."
    sections: list = [TextSection("Summary", text)]
    base_summary, base_name = None, "baseline"
    if baseline is not None:
        base_summary, base_name = baseline.summary, f"baseline {baseline.model}"
    sections.append(comparison_section(evaluation.summary, base_summary, "Results", evaluation.model, base_name))
    if paths:
        sections.append(ImageSection("Examples (worst, median, best slice by Dice)", paths, captions))
    write_comparison_report(out_dir, title or f"samadapt evaluation: {evaluation.model}", sections)
    return metrics


__all__ = [
    "ImageSection",
    "OverlayItem",
    "Section",
    "TableSection",
    "TextSection",
    "comparison_section",
    "markdown_table",
    "read_log_rows",
    "save_evaluation",
    "save_loss_curve",
    "save_overlay",
    "save_overlay_grid",
    "to_jsonable",
    "write_comparison_report",
    "write_csv",
    "write_json",
    "write_metrics_files",
    "write_report",
]
