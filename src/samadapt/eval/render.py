"""Rendering a report: ``report.md`` and a self-contained ``report.html`` from a list of sections.

Sections are ``TextSection``, ``TableSection`` and ``ImageSection``; the HTML embeds its pictures as base64 data URIs
and its CSS inline, and both files end with the metric definitions and empty-mask conventions of
``samadapt.eval.metrics``.
"""

from __future__ import annotations

import base64
import html
import math
import mimetypes
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samadapt.eval.metrics import EMPTY_MASK_CONVENTIONS, METRIC_DEFINITIONS
from samadapt.eval.results import as_float
from samadapt.files import atomic_write_text


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
                a, b = as_float(ours.get(key)), as_float(theirs.get(key))
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
            sign = np.sign(as_float(raw)) if column in table.better and isinstance(raw, (int, float)) else 0
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


def write_report(
    out_dir: str | Path,
    title: str,
    sections: Sequence[TextSection | TableSection | ImageSection],
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
    parts = list(sections)
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
    atomic_write_text(md_path, "\n".join(md))
    atomic_write_text(html_path, page)
    return md_path, html_path
