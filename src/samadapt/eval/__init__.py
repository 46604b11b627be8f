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
    slice_dice,
    surface_distances,
)

# figures import matplotlib: loaded on first use, so metrics stay cheap to import
_LAZY = {
    "ImageSection": "render",
    "TableSection": "render",
    "TextSection": "render",
    "comparison_section": "render",
    "markdown_table": "render",
    "write_report": "render",
    "save_loss_curve": "figures",
    "save_overlay": "figures",
    "save_overlay_grid": "figures",
    "write_metrics_files": "results",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"samadapt.eval.{_LAZY[name]}"), name)
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
    "slice_dice",
    "surface_distances",
    *_LAZY,
]
