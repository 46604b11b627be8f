"""Sparse slices to a full volume: ``samadapt complete`` against shape-based interpolation, from the same slices.

    python bench/completion.py [--tasks abdomen_ct,mni152] [--labelled 1,3,6] [--steps 120]
                               [--section NAME] [--out docs/interactive.md] [--runs DIR]

For each within-volume task, its first volume (sorted case ids) is "labelled" on n axial slices spread evenly over
the labelled structures' extent (slice ``zmin + (zmax - zmin) * (i + 0.5) / n``, as a user steps through an organ).
From those slices alone:

- **completion**: ``samadapt.complete.complete_volume`` (the semantic recipe, SAMed on LiteMedSAM, ``--steps``
  steps, adapted on the n slices, labelling every other slice);
- **interpolation**: ``data.interpolate.fill_between_slices``, the signed-distance blend of the two labelled slices
  that bracket each slice (Slicer's / ITK-SNAP's "fill between slices"; nothing outside the labelled range).

Both are scored in 3D against the volume's labels, per structure: Dice and HD95 (mm), whole volume (the labelled
slices are the same in both). Written between ``<!-- interactive:SECTION -->`` markers of ``--out``; raw numbers to
``--runs``/completion-SECTION.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.accuracy import TASKS  # noqa: E402
from bench.measure import write_section  # noqa: E402
from samadapt.complete import complete_volume  # noqa: E402
from samadapt.data.datasets import load_dataset  # noqa: E402
from samadapt.data.interpolate import fill_between_slices  # noqa: E402
from samadapt.data.io import Volume, read_label, read_volume  # noqa: E402
from samadapt.eval.metrics import dice, hd95  # noqa: E402

WITHIN_VOLUME = ("abdomen_ct", "mni152")


def spread_slices(labels: np.ndarray, n: int) -> list[int]:
    """n axial slices spread evenly over the extent of the labelled structures (distinct, sorted)."""
    z = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    low, high = int(z.min()), int(z.max())
    return sorted({int(round(low + (high - low) * (i + 0.5) / n)) for i in range(n)})


def scores(prediction: np.ndarray, truth: np.ndarray, classes: dict[int, str], spacing) -> dict:
    """Per structure 3D Dice and HD95 (mm; NaN where either side is empty)."""
    out = {}
    for value, name in classes.items():
        pred, gt = prediction == value, truth == value
        distance = hd95(pred, gt, spacing) if pred.any() and gt.any() else math.nan
        out[name] = {"dice": dice(pred, gt), "hd95_mm": distance}
    return out


def run_task(name: str, counts: list[int], steps: int, runs: Path, log) -> dict:
    spec = load_dataset(TASKS[name].dataset())
    case = sorted(spec.cases, key=lambda c: c.id)[0]
    image, truth = read_volume(case.image), read_label(case.label).array.astype(np.int64)
    classes = dict(spec.classes)
    in_plane = image.spacing[1:]
    results = {}
    for n in counts:
        given = spread_slices(truth, n)
        sparse = np.zeros_like(truth)
        sparse[given] = truth[given]
        labels = Volume(sparse, image.spacing, image.affine, path=case.label)
        tick = time.perf_counter()
        completed = complete_volume(
            image,
            labels,
            run_dir=runs / f"completion-{name}-{n}",
            steps=steps,
            slices=given,
            preprocessing=spec.preprocessing,
            classes=classes,
        )
        seconds = time.perf_counter() - tick
        interpolated = fill_between_slices({z: truth[z] for z in given}, truth.shape[0], list(classes), in_plane)
        row = {
            "slices": given,
            "seconds": seconds,
            "completion": scores(completed, truth, classes, image.spacing),
            "interpolation": scores(interpolated, truth, classes, image.spacing),
        }
        for method in ("completion", "interpolation"):
            row[f"{method}_mean_dice"] = float(np.mean([v["dice"] for v in row[method].values()]))
        results[n] = row
        log(
            f"{name} n={n} slices {given}: completion {row['completion_mean_dice']:.3f} "
            f"({seconds:.0f} s), interpolation {row['interpolation_mean_dice']:.3f}"
        )
    return {"case": case.id, "shape": list(truth.shape), "counts": results}


def table(results: dict) -> list[str]:
    lines = [
        "| task | labelled slices | completion Dice | interpolation Dice | difference | completion s |",
        "|---|---|---|---|---|---|",
    ]
    for name, task in results.items():
        for n, row in task["counts"].items():
            a, b = row["completion_mean_dice"], row["interpolation_mean_dice"]
            lines.append(
                f"| {name} | {n} ({', '.join(map(str, row['slices']))}) | {a:.3f} | {b:.3f} | {a - b:+.3f} | "
                f"{row['seconds']:.0f} |"
            )
    return lines


def per_structure(results: dict) -> list[str]:
    lines = []
    for name, task in results.items():
        counts = list(task["counts"])
        structures = list(next(iter(task["counts"].values()))["completion"])
        header = " | ".join(f"{n}: completion / interpolation" for n in counts)
        lines += [
            "",
            f"{name} ({task['case']}, {' x '.join(map(str, task['shape']))}), 3D Dice per structure:",
            "",
            f"| structure | {header} |",
            "|---|" + "---|" * len(counts),
        ]
        for s in structures:
            cells = " | ".join(
                f"{task['counts'][n]['completion'][s]['dice']:.3f} / {task['counts'][n]['interpolation'][s]['dice']:.3f}"
                for n in counts
            )
            lines.append(f"| {s} | {cells} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(WITHIN_VOLUME))
    parser.add_argument("--labelled", default="1,3,6", help="numbers of labelled slices")
    parser.add_argument("--steps", type=int, default=120, help="completion's training steps (samadapt complete's)")
    parser.add_argument("--section", default="completion")
    parser.add_argument("--out", type=Path, default=Path("docs/interactive.md"))
    parser.add_argument("--runs", type=Path, default=Path("bench-runs"))
    args = parser.parse_args(argv)
    args.runs.mkdir(parents=True, exist_ok=True)
    started, wall = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    results = {}
    for name in args.tasks.split(","):
        results[name] = run_task(name, [int(n) for n in args.labelled.split(",")], args.steps, args.runs, log)
        (args.runs / f"completion-{args.section}.json").write_text(json.dumps(results, indent=2))
    text = [
        f"## Completion against shape-based interpolation ({started})",
        "",
        f"`python bench/{Path(__file__).name} {shlex.join(argv if argv is not None else sys.argv[1:])}`: "
        f"{(time.perf_counter() - wall) / 60:.1f} min on {os.cpu_count()} cores, torch {torch.__version__}. "
        f"Mean 3D Dice over the structures, whole volume; SAMed on LiteMedSAM, {args.steps} steps.",
        "",
        *table(results),
        *per_structure(results),
    ]
    write_section(args.out, f"interactive:{args.section}", "\n".join(text), title="# Interactive 3D segmentation\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
