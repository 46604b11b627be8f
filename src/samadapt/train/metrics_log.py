"""A training run's metrics log: ``RUN_DIR/metrics.csv`` (one row per step), TensorBoard scalars when it is
installed, and the loss curve at the end."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence

from samadapt.runs import RunLayout

# logged per step but no training curve: not sent to TensorBoard
_TIMINGS = ("step", "seconds_per_step", "loader_seconds")


class MetricsLog:
    """Rows of ``fields`` (other keys of a row are left out; a NaN / inf value is an empty cell)."""

    def __init__(self, layout: RunLayout, fields: Sequence[str], tensorboard: bool = False) -> None:
        self.layout = layout
        self.fields = tuple(fields)
        self._board = _tensorboard(layout) if tensorboard else None

    def write(self, row: dict, first: bool = False) -> None:
        """Append ``row``; ``first`` (or no file yet) starts the file with its header."""
        path = self.layout.metrics_csv
        new = first or not path.exists()
        with path.open("w" if new else "a", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore")
            if new:
                out.writeheader()
            out.writerow(_finite(row))
        if self._board is not None:
            for key in self.fields:
                if key not in _TIMINGS and key in row:
                    self._board.add_scalar(key, row[key], row["step"])

    def rewrite(self, rows: Sequence[dict]) -> None:
        """The log as of a resumed step: rows logged after that checkpoint (by a killed job) are dropped."""
        self.layout.root.mkdir(parents=True, exist_ok=True)
        with self.layout.metrics_csv.open("w", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore")
            out.writeheader()
            out.writerows(_finite(row) for row in rows)

    def plot(self, rows: Sequence[dict]) -> None:
        """The loss curve (``loss_curve.png``), when the plotting extra is installed."""
        try:
            from samadapt.eval.figures import save_loss_curve
        except ImportError:
            return
        save_loss_curve(rows, self.layout.loss_curve)


def _finite(row: dict) -> dict:
    return {k: v for k, v in row.items() if not isinstance(v, float) or math.isfinite(v)}


def _tensorboard(layout: RunLayout):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: the CSV log is always written
        return None
    return SummaryWriter(str(layout.root / "tensorboard"))
