"""The report of one evaluation (or two: adapted and baseline): metrics files, example overlays, report.md / .html.

Its parts have their own modules: ``results`` (JSON / CSV), ``figures`` (pictures), ``render`` (Markdown / HTML).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from samadapt.eval.figures import save_interactive_curve, save_overlay
from samadapt.eval.metrics import slice_dice
from samadapt.eval.render import ImageSection, TableSection, TextSection, comparison_section, write_report
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
    if "interactive" in evaluation.summary:
        sections += interactive_sections(out_dir, evaluation, baseline)
    if paths:
        sections.append(ImageSection("Examples (worst, median, best slice by Dice)", paths, captions))
    write_report(out_dir, title or f"samadapt evaluation: {evaluation.model}", sections)
    return metrics


def interactive_sections(out_dir: Path, evaluation, baseline=None) -> list:
    """The interactive protocol's table (per class: final Dice, DSC-AUC, NSD-AUC, clicks to the target Dice, seconds
    per object) and its curve (mean Dice after each step), for the model and its baseline."""
    models = [(evaluation.model, evaluation.summary["interactive"])]
    if baseline is not None and "interactive" in baseline.summary:
        models.append((f"baseline {baseline.model}", baseline.summary["interactive"]))
    first = models[0][1]
    columns = ["model", "class", "final Dice", "final NSD", "DSC-AUC", "NSD-AUC", "reached", "clicks to target", "s"]
    rows = []
    for name, figures in models:
        for class_name, entry in [*figures["per_class"].items(), ("mean", figures)]:
            if not entry or (class_name != "mean" and not entry.get("objects")):
                continue
            reached = f"{entry['reached_target']}/{entry['objects']}" if "objects" in entry else ""
            rows.append(
                {
                    "model": name,
                    "class": class_name,
                    "final Dice": entry["final_dice"],
                    "final NSD": entry["final_nsd"],
                    "DSC-AUC": entry["dsc_auc"],
                    "NSD-AUC": entry["nsd_auc"],
                    "reached": reached,
                    "clicks to target": entry.get("clicks_to_target"),
                    "s": entry["seconds"],
                }
            )
    note = (
        f"A 3D box, then {first['clicks']} corrective clicks in the largest 3D error component "
        f"(given as {first.get('clicks_as', 'points')}; propagation {'with memory' if first.get('memory') else 'by box'})."
        " DSC-AUC / NSD-AUC: trapezoid area "
        f"over the click steps (0 to {max(first['clicks'] - 1, 0)}). Reached: objects at Dice >= "
        f"{first['target_dice']} within the clicks; clicks to target: their mean (0: the box alone). s: the model's "
        "seconds per object."
    )
    table = TableSection(
        "Interactive segmentation", columns, rows, note, formats={"s": ".1f", "clicks to target": ".1f"}
    )
    curve = save_interactive_curve({n: f["dice_steps"] for n, f in models}, out_dir / "interactive_dice.png")
    return [table, ImageSection("Dice after each interaction", [curve])]
