"""The report of one evaluation (or two: adapted and baseline): metrics files, example overlays, report.md / .html.

Its parts have their own modules: ``results`` (JSON / CSV), ``figures`` (pictures), ``render`` (Markdown / HTML).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from samadapt.eval.figures import save_overlay
from samadapt.eval.metrics import slice_dice
from samadapt.eval.render import ImageSection, TextSection, comparison_section, write_report
from samadapt.eval.results import write_metrics_files


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
        scored = [(slice_dice(r, class_id), r) for r in evaluation.slices if (np.asarray(r.gt) == class_id).any()]
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
    write_report(out_dir, title or f"samadapt evaluation: {evaluation.model}", sections)
    return metrics
