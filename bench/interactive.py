"""The interactive protocol (a 3D box, then N corrective clicks) on the real volumes of ``../shared/data``.

    python bench/interactive.py [--tasks abdomen_ct,hn_oar,brats] [--clicks 5] [--max-volumes 1]
                                [--variants box,points,memory] [--adapted RUN] [--section NAME]
                                [--out docs/interactive.md]

For each task, the un-adapted LiteMedSAM on its first ``--max-volumes`` volumes (sorted case ids), every labelled
structure an object (``eval.interactive``). Variants, each on the same volumes and clicks rule:

- ``box``: clicks edit the slice's box (``interactive.VolumeObject(clicks_as="box")``);
- ``points``: clicks given to SAM as point prompts beside the box (the default);
- ``memory``: as ``box``, and every propagated slice also gets its neighbour's low-resolution logits as mask prompt.

With ``--adapted RUN`` (a run adapted on other patients of the task, e.g. a cell of ``bench/accuracy.py``), the
same clicks are given to that run too, on volumes it did not learn from (its exemplars.json): the effort adaptation
saves (clicks to Dice 0.9, DSC-AUC).

Written between ``<!-- interactive:SECTION -->`` markers of ``--out``: per task and variant the mean Dice after the
box and after each click, DSC-AUC, NSD-AUC, final Dice / NSD, objects reaching Dice 0.9, seconds per object; per
structure the final Dice of the default variant. Raw numbers go to ``--runs``/interactive-SECTION.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.accuracy import TASKS  # noqa: E402
from bench.measure import write_section  # noqa: E402
from samadapt.data.datasets import SliceDataset, load_dataset  # noqa: E402
from samadapt.eval.interactive import evaluate_interactive  # noqa: E402
from samadapt.inference import load_predictor  # noqa: E402

VARIANTS = {
    "box": dict(clicks_as="box"),
    "points": dict(clicks_as="points"),
    "memory": dict(clicks_as="box", memory=True),
}


def trained_cases(run_dir: Path) -> set[str]:
    """The volumes an adapted run learnt from (its exemplars.json): never scored, so that the effort it saves is
    measured on patients it has not seen."""
    return {entry["case"] for entry in json.loads((run_dir / "exemplars.json").read_text())["labelled"]}


def run_task(name: str, clicks: int, max_volumes: int, variants: list[str], log, adapted: Path | None = None) -> dict:
    spec = load_dataset(TASKS[name].dataset())
    slices = SliceDataset(spec)
    seen = trained_cases(adapted) if adapted else set()
    cases = sorted(c.id for c in spec.cases if c.id not in seen)[:max_volumes]
    models = {"": load_predictor("lite_medsam")}
    if adapted:  # the same clicks for the run adapted on other patients
        models[", adapted"] = load_predictor(str(adapted))
    results = {}
    for variant in variants:
        for suffix, predictor in models.items():
            tick = time.perf_counter()
            _, summary = evaluate_interactive(
                predictor.run,
                slices,
                cases,
                spec.classes,
                predictor,
                clicks=clicks,
                progress=False,
                **VARIANTS[variant],
            )
            figures = summary["interactive"]
            key = variant + suffix
            results[key] = {**figures, "wall_s": time.perf_counter() - tick, "cases": cases}
            log(
                f"{name} {key}: Dice {' '.join(f'{d:.3f}' for d in figures['dice_steps'])}, "
                f"DSC-AUC {figures['dsc_auc']:.2f}, {results[key]['wall_s']:.0f} s"
            )
    return results


def table(results: dict, clicks: int) -> list[str]:
    steps = " | ".join(["box", *[f"+{k}" for k in range(1, clicks + 1)]])
    lines = [
        f"| task | variant | {steps} | DSC-AUC | NSD-AUC | final NSD | reached 0.9 | s / object |",
        "|---|---|" + "---|" * (clicks + 1) + "---|---|---|---|---|",
    ]
    for task, variants in results.items():
        for variant, f in variants.items():
            reached = sum(c.get("reached_target", 0) for c in f["per_class"].values() if c)
            objects = sum(c.get("objects", 0) for c in f["per_class"].values() if c)
            dice = " | ".join(f"{d:.3f}" for d in f["dice_steps"])
            lines.append(
                f"| {task} | {variant} | {dice} | {f['dsc_auc']:.2f} | {f['nsd_auc']:.2f} | {f['final_nsd']:.3f} "
                f"| {reached}/{objects} | {f['seconds']:.1f} |"
            )
    return lines


def per_structure(results: dict, variant: str) -> list[str]:
    lines = ["| task | structure | Dice after the box | final Dice | clicks to 0.9 |", "|---|---|---|---|---|"]
    for task, variants in results.items():
        if variant not in variants:
            continue
        for name, entry in variants[variant]["per_class"].items():
            if not entry:
                continue
            reached = "n/a" if entry["clicks_to_target"] is None else f"{entry['clicks_to_target']:.1f}"
            lines.append(f"| {task} | {name} | {entry['dice_steps'][0]:.3f} | {entry['final_dice']:.3f} | {reached} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="abdomen_ct,hn_oar,brats")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--max-volumes", type=int, default=1)
    parser.add_argument("--variants", default="box,points,memory")
    parser.add_argument(
        "--adapted", type=Path, help="also an adapted run (its exemplars' patients are left out of the scored volumes)"
    )
    parser.add_argument("--section", default="latest")
    parser.add_argument("--out", type=Path, default=Path("docs/interactive.md"))
    parser.add_argument("--runs", type=Path, default=Path("runs/interactive"))
    args = parser.parse_args(argv)
    tasks, variants = args.tasks.split(","), args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {message}", flush=True)

    results = {name: run_task(name, args.clicks, args.max_volumes, variants, log, args.adapted) for name in tasks}
    wall = time.perf_counter() - started
    args.runs.mkdir(parents=True, exist_ok=True)
    (args.runs / f"interactive-{args.section}.json").write_text(json.dumps(results, indent=2))
    command = "python bench/interactive.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    text = [
        f"## {args.section}",
        "",
        f"`{command}`: {wall / 60:.1f} min on {os.cpu_count()} CPU cores ({threads} torch threads), the un-adapted "
        f"LiteMedSAM{' and the adapted run (rows marked adapted)' if args.adapted else ''}, the first "
        f"{args.max_volumes} volume(s) of each task{' it did not learn from' if args.adapted else ''}, {args.clicks} "
        "clicks. Mean Dice (3D, over structures) after the box and after each click:",
        "",
        *table(results, args.clicks),
        "",
        f"Per structure ({variants[0]}):",
        "",
        *per_structure(results, variants[0]),
        *(
            ["", f"Per structure ({variants[0]}, adapted):", "", *per_structure(results, variants[0] + ", adapted")]
            if args.adapted
            else []
        ),
    ]
    write_section(args.out, f"interactive:{args.section}", "\n".join(text), title="# Interactive 3D segmentation\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
