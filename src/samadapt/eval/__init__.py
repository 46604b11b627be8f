"""Evaluation: metrics in physical units (Dice, IoU, HD95 mm, NSD), their aggregation, and reports."""

from samadapt.eval.metrics import (
    DEFAULT_TOLERANCE_MM,
    EMPTY_MASK_CONVENTIONS,
    METRIC_DEFINITIONS,
    METRICS,
    MetricAccumulator,
    aggregate,
    binary_metrics,
    compute_case_metrics,
    dice,
    hd95,
    iou,
    nsd,
    surface_distances,
)

# the report writer imports matplotlib: loaded on first use, so metrics stay cheap to import
_REPORT = (
    "ImageSection",
    "TableSection",
    "TextSection",
    "comparison_section",
    "markdown_table",
    "save_loss_curve",
    "save_overlay",
    "save_overlay_grid",
    "write_comparison_report",
    "write_metrics_files",
)


def __getattr__(name: str):
    if name in _REPORT:
        from samadapt.eval import report

        return getattr(report, name)
    raise AttributeError(f"module 'samadapt.eval' has no attribute {name!r}")


__all__ = [
    "DEFAULT_TOLERANCE_MM",
    "EMPTY_MASK_CONVENTIONS",
    "METRICS",
    "METRIC_DEFINITIONS",
    "MetricAccumulator",
    "aggregate",
    "binary_metrics",
    "compute_case_metrics",
    "dice",
    "hd95",
    "iou",
    "nsd",
    "surface_distances",
    *_REPORT,
]
