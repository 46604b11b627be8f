"""Results as files: strict JSON (NaN and inf written as ``null``), CSV (NaN as an empty cell), and reading logs back."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np

from samadapt.eval.metrics import EMPTY_MASK_CONVENTIONS
from samadapt.files import atomic_write, atomic_write_text

_ROW_KEYS = ("model", "case", "slice", "class")  # leading metrics.csv columns, when present


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
    return atomic_write_text(path, json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n")


def _csv_cell(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value.item() if isinstance(value, np.generic) else value


def write_csv(path: str | Path, rows: Sequence[Mapping]) -> Path:
    """One CSV line per row; columns are the union of keys (``model, case, slice, class`` first), NaN -> empty."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    columns = [k for k in _ROW_KEYS if k in keys] + [k for k in keys if k not in _ROW_KEYS]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows({k: _csv_cell(v) for k, v in row.items()} for row in rows)

    return atomic_write(path, write)


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


def as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan  # empty CSV cell, None or missing


def read_log_rows(csv_or_rows: str | Path | Sequence[Mapping]) -> list[dict]:
    """Training log rows (``step``, ``loss``, ``lr``, ``val_dice``...) as floats, NaN where missing or empty."""
    if isinstance(csv_or_rows, (str, Path)):
        with Path(csv_or_rows).open(newline="", encoding="utf-8") as handle:
            csv_or_rows = list(csv.DictReader(handle))
    return [{k: as_float(v) for k, v in row.items()} for row in csv_or_rows]
