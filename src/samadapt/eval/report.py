"""Reports: metrics files, overlay pictures, loss curves, and a Markdown + self-contained HTML page.

JSON is strict (NaN written as null). Pictures are PNG; the HTML embeds them as data URIs so the page is one file.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from samadapt.eval.metrics import EMPTY_MASK_CONVENTIONS, METRICS  # noqa: E402

COLOURS = ["#ff3b30", "#34c759", "#0a84ff", "#ffcc00", "#bf5af2", "#64d2ff", "#ff9f0a", "#ac8e68"]


def _clean(value):
    """NaN / inf -> None, recursively, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(_clean(data), indent=2, allow_nan=False))
    return path


def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(
            [
                {k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in r.items()}
                for r in rows
            ]
        )
    return path


def save_overlay(
    image: np.ndarray,
    gt: np.ndarray,
    preds: dict[int, np.ndarray],
    path: Path,
    title: str = "",
    prompts: Sequence = (),
) -> Path:
    """Grey image, ground-truth contours (white, dashed) and predicted masks per class (colour), with the prompts."""
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.imshow(image if image.ndim == 3 else image, cmap=None if image.ndim == 3 else "gray", interpolation="nearest")
    for k, (class_id, mask) in enumerate(sorted(preds.items())):
        colour = COLOURS[k % len(COLOURS)]
        if mask.any():
            ax.contourf(mask.astype(float), levels=[0.5, 1.5], colors=[colour], alpha=0.35)
            ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.2)
        if (gt == class_id).any():
            ax.contour((gt == class_id).astype(float), levels=[0.5], colors=["white"], linewidths=1.0, linestyles="--")
    for kind, prompt in prompts:
        if kind == "box" and prompt is not None:
            x0, y0, x1, y1 = prompt
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="#ffcc00", linewidth=1.2))
        elif kind == "point":
            ax.plot(
                prompt.x,
                prompt.y,
                marker="*",
                markersize=10,
                color="#34c759" if prompt.positive else "#ff3b30",
                markeredgecolor="black",
            )
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_loss_curve(history: Sequence[dict], path: str | Path) -> Path:
    """Training loss (and validation Dice where measured) against the step."""
    path = Path(path)
    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(steps, [r["loss"] for r in history], color="#0a84ff", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    val = [
        (r["step"], r["val_dice"]) for r in history if r.get("val_dice") is not None and math.isfinite(r["val_dice"])
    ]
    if val:
        other = ax.twinx()
        other.plot(*zip(*val, strict=True), color="#34c759", marker="o", label="validation Dice")
        other.set_ylabel("validation Dice")
        other.set_ylim(0, 1)
    ax.set_title("training")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def comparison_rows(adapted: dict, baseline: dict | None) -> list[list[str]]:
    """Table rows per class: adapted Dice / HD95, baseline Dice / HD95, and the Dice difference."""
    rows = []
    for name, values in adapted["per_class"].items():
        row = [name, _fmt(values["dice"]), _fmt(values["hd95_mm"], 1)]
        if baseline is not None:
            base = baseline["per_class"].get(name, {})
            delta = (values["dice"] - base["dice"]) if base and not math.isnan(base.get("dice", math.nan)) else math.nan
            row += [_fmt(base.get("dice")), _fmt(base.get("hd95_mm"), 1), _fmt(delta)]
        rows.append(row)
    return rows


@dataclass
class Section:
    """A report section: optional text, a table (columns + rows) and pictures (path, caption)."""

    title: str
    text: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    images: list[tuple[Path, str]] = field(default_factory=list)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out_dir: Path, title: str, sections: Sequence[Section]) -> tuple[Path, Path]:
    """report.md (pictures by relative path) and report.html (pictures embedded): one page a person can read."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        md += [f"## {section.title}", ""]
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            md += [section.text, ""]
            body.append(f"<p>{html.escape(section.text)}</p>")
        if section.columns:
            md += [markdown_table(section.columns, section.rows), ""]
            head = "".join(f"<th>{html.escape(c)}</th>" for c in section.columns)
            cells = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in section.rows
            )
            body.append(f"<table><tr>{head}</tr>{cells}</table>")
        if section.images:
            figures = []
            for path, caption in section.images:
                md.append(
                    f"![{caption}]({Path(path).relative_to(out_dir) if Path(path).is_relative_to(out_dir) else path})"
                )
                data = base64.b64encode(Path(path).read_bytes()).decode()
                figures.append(
                    f'<figure><img src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>'
                )
            md.append("")
            body.append('<div class="figures">' + "".join(figures) + "</div>")
    md += ["## Conventions", "", EMPTY_MASK_CONVENTIONS, ""]
    body.append(f"<h2>Conventions</h2><p>{html.escape(EMPTY_MASK_CONVENTIONS)}</p>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}.figures{display:flex;flex-wrap:wrap;gap:8px}"
        "figure{margin:0}figcaption{font-size:12px;text-align:center}img{max-width:340px}"
    )
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text("\n".join(md))
    html_path.write_text(page)
    return md_path, html_path


def pick_examples(results: Sequence, class_id: int, dice_of) -> list[tuple[str, object]]:
    """The best, median and worst slices by Dice for one class (slices where the class is present)."""
    scored = [(dice_of(r, class_id), r) for r in results if (r.gt == class_id).any()]
    scored = [(d, r) for d, r in scored if not math.isnan(d)]
    if not scored:
        return []
    scored.sort(key=lambda x: x[0])
    picks = [("worst", scored[0]), ("median", scored[len(scored) // 2]), ("best", scored[-1])]
    return [(label, item) for label, item in picks]


def metric_columns(with_baseline: bool) -> list[str]:
    columns = ["class", "Dice", "HD95 (mm)"]
    return columns + ["baseline Dice", "baseline HD95 (mm)", "Dice change"] if with_baseline else columns


def save_evaluation(out_dir: str | Path, evaluation, baseline=None, title: str | None = None) -> dict:
    """metrics.json, metrics.csv (both models' rows), overlays of the best / median / worst slices, report.md/.html."""
    from samadapt.eval.evaluate import slice_dice

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = evaluation.metrics_json()
    if baseline is not None:
        metrics["baseline"] = baseline.metrics_json()
    write_json(out_dir / "metrics.json", metrics)
    rows = [{"model": evaluation.model, **r} for r in evaluation.rows]
    rows += [{"model": f"baseline {baseline.model}", **r} for r in baseline.rows] if baseline is not None else []
    write_csv(out_dir / "metrics.csv", rows)
    images = []
    class_ids = sorted({c for r in evaluation.slices for c in r.pred})
    for class_id in class_ids[:3]:
        for label, result in pick_examples(evaluation.slices, class_id, slice_dice):
            path = out_dir / f"overlay_class{class_id}_{label}.png"
            caption = f"{label}: {result.case} slice {result.slice}, Dice {slice_dice(result, class_id):.3f}"
            save_overlay(result.image, result.gt, {class_id: result.pred[class_id]}, path, caption, result.prompts)
            images.append((path, caption))
    table = comparison_rows(evaluation.summary, baseline.summary if baseline is not None else None)
    text = f"Model {evaluation.model}, prompts {evaluation.protocol}, {metrics['units']} units from {metrics['cases']} cases."
    if baseline is not None:
        text += f" Baseline: {baseline.model} with the same prompts ({baseline.protocol}, same seed)."
    sections = [
        Section("Results", text, metric_columns(baseline is not None), table),
        Section("Examples", images=images),
    ]
    write_report(out_dir, title or f"samadapt evaluation: {evaluation.model}", sections)
    return metrics


__all__ = [
    "METRICS",
    "Section",
    "comparison_rows",
    "pick_examples",
    "save_loss_curve",
    "save_overlay",
    "write_csv",
    "write_json",
    "write_report",
]
