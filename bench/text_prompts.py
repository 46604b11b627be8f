"""Text prompts against clicks and boxes: the same recipe, exemplars, seed and held-out slices, trained once per
prompt kind and scored with its own protocol.

    python bench/text_prompts.py [--tasks lesions,mni152] [--k 3] [--seeds 0] [--steps 60] [--recipe cheap-lunch]
                                 [--out docs/text_prompts.md]

For every (task, k, seed), with ``bench/accuracy.py``'s tasks, exemplar choice and held-out slices:

- the un-adapted LiteMedSAM with ``point:1`` and ``box`` (it cannot read text);
- the recipe trained with ``prompt.kind=point`` and scored with ``point:1``; with ``box`` and scored with ``box``;
- the recipe trained with ``prompt.kind=text`` (the projection trains beside the recipe's parameters) and scored
  with ``text:heldout`` (a phrase never drawn in training) and ``text:name`` (the plain class name);
- with ``--kinds`` also ``text-mixed`` (one model for text, clicks and boxes), scored with all four protocols.

Dice from ``samadapt.eval`` (2D per slice, mean over slices then classes). Results go between
``<!-- accuracy:text:SECTION -->`` markers of ``--out`` and to ``--runs``/results-SECTION.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.accuracy import TASKS, _ints, _stat, cell_slices, write_accuracy_section
from samadapt.demo import recipe_config
from samadapt.eval.evaluate import evaluate_slices_under
from samadapt.runs import load_run
from samadapt.train.api import fit_slices
from samadapt.train.config import TrainConfig, layered_config

# prompt kind trained -> protocols it is scored with
KINDS = {
    "point": ("point:1",),
    "box": ("box",),
    "text": ("text:heldout", "text:name"),
    "text-mixed": ("text:heldout", "text:name", "point:1", "box"),
}
BASELINE = ("point:1", "box")


def run_cell(task_name: str, k: int, seed: int, args, runs: Path, log) -> dict:
    cell_data = cell_slices(TASKS[task_name], k, seed, args.gap, args.max_test)
    spec, classes, slices = cell_data.spec, cell_data.classes, cell_data.slices
    cell = {"task": task_name, "k": k, "seed": seed, "held_out": len(cell_data.test), "results": {}}
    test_items = [slices[i] for i in cell_data.test]
    same = dict(seed=seed, precision=TrainConfig().train.precision, progress=False)
    base = load_run("lite_medsam")
    evaluations = evaluate_slices_under(base, test_items, classes, list(BASELINE), **same)
    cell["results"]["un-adapted"] = {p: e.summary["mean_dice"] for p, e in zip(BASELINE, evaluations, strict=True)}
    items = cell_data.training_items(prompted=True)
    for kind in args.kinds:
        config = recipe_config(args.recipe, args.steps, args.batch_size, seed)
        config = layered_config(TrainConfig, config.to_dict(), sets=[f"prompt.kind={kind}", *args.set])
        config.data.path = str(spec.root)
        run_dir = runs / f"{task_name}_k{k}_s{seed}_{kind}"
        tick = time.perf_counter()
        result = fit_slices(config, items, [], classes, run_dir, spec.preprocessing, verbose=False)
        seconds = time.perf_counter() - tick
        adapted = load_run(run_dir, checkpoint="last")
        protocols = list(KINDS[kind])
        evaluations = evaluate_slices_under(adapted, test_items, classes, protocols, **same)
        losses = [row["loss"] for row in result.history]
        entry = {p: e.summary["mean_dice"] for p, e in zip(protocols, evaluations, strict=True)}
        entry["per_class"] = {
            p: {n: v["dice"] for n, v in e.summary["per_class"].items()}
            for p, e in zip(protocols, evaluations, strict=True)
        }
        entry["train"] = {"first_loss": losses[0], "last_loss": float(np.mean(losses[-5:])), "seconds": seconds}
        cell["results"][kind] = entry
        scores = ", ".join(f"{p} {entry[p]:.3f}" for p in protocols)
        log(
            f"{task_name} k={k} seed={seed} trained on {kind}: {scores}; loss {losses[0]:.3f} -> "
            f"{entry['train']['last_loss']:.3f}, {seconds:.0f} s"
        )
    return cell


def table(cells: list[dict], args) -> list[str]:
    lines = [
        "| task | k | trained with | scored with | adapted Dice | un-adapted Dice (same protocol) | held-out slices |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in args.tasks:
        for k in args.k:
            mine = [c for c in cells if c["task"] == task and c["k"] == k]
            held = "/".join(str(c["held_out"]) for c in mine)
            for kind in args.kinds:
                for protocol in KINDS[kind]:
                    adapted = [c["results"][kind][protocol] for c in mine if kind in c["results"]]
                    base = [c["results"]["un-adapted"][protocol] for c in mine] if protocol in BASELINE else []
                    base_text = _stat(base, 3) if base else "cannot read text"
                    lines.append(f"| {task} | {k} | {kind} | {protocol} | {_stat(adapted, 3)} | {base_text} | {held} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="lesions,mni152")
    parser.add_argument("--kinds", default="point,box,text", help=f"prompt kinds trained, of {', '.join(KINDS)}")
    parser.add_argument("--recipe", default="cheap-lunch")
    parser.add_argument("--k", default="3", help="exemplar counts, comma-separated")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-test", type=int, default=12)
    parser.add_argument("--gap", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, all runs")
    parser.add_argument("--section", default="latest")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", type=Path, default=Path("docs/text_prompts.md"))
    parser.add_argument("--runs", type=Path, default=Path("runs/text_prompts"))
    args = parser.parse_args(argv)
    args.tasks, args.kinds = args.tasks.split(","), args.kinds.split(",")
    args.k, args.seeds = _ints(args.k), _ints(args.seeds)
    unknown = [t for t in args.tasks if t not in TASKS] + [k for k in args.kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown tasks or kinds {unknown}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {message}", flush=True)

    runs = args.runs / args.section
    cells = [run_cell(t, k, s, args, runs, log) for t in args.tasks for k in args.k for s in args.seeds]
    wall = time.perf_counter() - started
    command = "python bench/text_prompts.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    header = [
        f"## {args.title or args.section}",
        "",
        f"Command: `{command}`. Wall time {wall / 60:.1f} min ({torch.get_num_threads()} threads).",
        f"Recipe {args.recipe}; tasks {', '.join(args.tasks)}; k = {args.k}; seeds {args.seeds}; {args.steps} steps "
        f"of batch {args.batch_size}; overrides {args.set or 'none'}; held-out slices at least {args.gap} slices from "
        f"every exemplar, at most {args.max_test}. Cells: mean ± standard deviation over seeds (one seed: a number).",
        "",
    ]
    write_accuracy_section(args.out, f"text:{args.section}", "\n".join(header + table(cells, args)))
    args.runs.mkdir(parents=True, exist_ok=True)
    (args.runs / f"results-{args.section}.json").write_text(
        json.dumps({"wall_seconds": wall, "command": command, "cells": cells}, indent=1, default=str)
    )
    print("\n".join(table(cells, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
