"""Encoder pre-training ablation: few-exemplar Dice with and without self-supervised pre-training (issue 15).

    python bench/pretraining.py [--tasks lesions,mni152] [--k 3] [--seeds 0] [--steps 40] [--recipe cheap-lunch]
                                [--method mix] [--pretrain-steps 24] [--pretrain-batch 2] [--max-test 12]
                                [--section NAME] [--out docs/pretraining.md] [--runs runs/pretraining]

Per task: one pre-training run (``samadapt.pretrain``, the recipe's encoder PEFT slots) on every slice of the task's
scans, labels ignored (the held-out slices' images included: the unlabelled slices of the same scans, as a user
would pre-train on the volumes they segment). Then, for each (k, seed), ``bench/accuracy.py``'s cell twice with the
same exemplars, held-out slices, seeds and prompts: the recipe from scratch, and the recipe started from the
pre-trained encoder (``model.init``). Dice on the held-out slices for point:1, point:3 and box, beside the un-adapted
model; the table goes between ``<!-- accuracy:SECTION -->`` markers of ``--out``, raw numbers to
``--runs``/results-SECTION.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from bench.accuracy import PROMPTS, TASKS, Grid, _stat, run_cell, write_accuracy_section
from samadapt.pretrain import PretrainConfig, pretrain
from samadapt.pretrain.config import pretrain_defaults
from samadapt.train.config import layered_config


def pretrain_task(task: str, args: argparse.Namespace, runs: Path, log) -> tuple[Path, dict]:
    """The task's pre-training run (resumed, so an interrupted bench does not start it again)."""
    data = pretrain_defaults(args.recipe)
    overrides = [
        f"method={args.method}",
        f"data.path={TASKS[task].dataset()}",
        f"train.steps={args.pretrain_steps}",
        f"train.batch_size={args.pretrain_batch}",
        f"optim.lr={args.pretrain_lr}",
        f"optim.warmup_steps={max(1, args.pretrain_steps // 10)}",
        "data.workers=1",
    ]
    config = layered_config(PretrainConfig, data, sets=overrides)
    run_dir = runs / f"{task}_pretrain_{args.method}"
    tick = time.perf_counter()
    result = pretrain(config, run_dir, resume=True, verbose=False)
    losses = [row["loss"] for row in result.history]
    facts = {
        "steps": result.steps,
        "first_loss": losses[0],
        "last_loss": sum(losses[-3:]) / len(losses[-3:]),
        "seconds": time.perf_counter() - tick,
        "slices": json.loads((run_dir / "checkpoints" / "last" / "adapter_config.json").read_text())["pretrain"][
            "slices"
        ],
    }
    log(f"{task}: pre-trained {facts['steps']} steps, loss {facts['first_loss']:.3f} -> {facts['last_loss']:.3f}")
    return run_dir, facts


def table(cells: list[dict], recipe: str) -> list[str]:
    lines = [
        "| task | k | prompt | without pre-training | with pre-training | difference | un-adapted | held-out |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(c["task"], c["k"]) for c in cells})
    for task, k in keys:
        mine = [c for c in cells if c["task"] == task and c["k"] == k and c["plain"]["results"]]
        if not mine:
            continue
        for prompt in PROMPTS:
            plain = [c["plain"]["results"][recipe][prompt]["dice"] for c in mine]
            pre = [c["pretrained"]["results"][recipe][prompt]["dice"] for c in mine]
            base = [c["plain"]["results"]["un-adapted"][prompt]["dice"] for c in mine]
            diff = [b - a for a, b in zip(plain, pre, strict=True)]
            held = "/".join(str(c["plain"]["held_out"]) for c in mine)
            lines.append(
                f"| {task} | {k} | {prompt} | {_stat(plain, 3)} | {_stat(pre, 3)} | {_stat(diff, 3)} | "
                f"{_stat(base, 3)} | {held} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="lesions,mni152")
    parser.add_argument("--k", default="3", help="exemplar counts, comma-separated")
    parser.add_argument("--seeds", default="0", help="seeds, comma-separated")
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps per run")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--recipe", default="cheap-lunch")
    parser.add_argument("--method", default="mix", help="pre-training objective: mae, emix, shed or mix")
    parser.add_argument("--pretrain-steps", type=int, default=24)
    parser.add_argument("--pretrain-batch", type=int, default=2)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--max-test", type=int, default=12)
    parser.add_argument("--gap", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--section", default="latest")
    parser.add_argument("--out", type=Path, default=Path("docs/pretraining.md"))
    parser.add_argument("--runs", type=Path, default=Path("runs/pretraining"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs = args.runs / args.section

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {message}", flush=True)

    ks = [int(v) for v in args.k.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    cells, pretraining = [], {}
    for task in args.tasks.split(","):
        run_dir, pretraining[task] = pretrain_task(task, args, runs, log)
        for k in ks:
            for seed in seeds:
                cell = {"task": task, "k": k, "seed": seed}
                for arm, overrides in (("plain", []), ("pretrained", [f"model.init={run_dir}"])):
                    grid = Grid([task], [args.recipe], [k], [seed], args.steps, args.batch_size, args.max_test,
                                args.gap, {}, overrides)  # fmt: skip
                    cell[arm] = run_cell(TASKS[task], k, seed, grid, runs / arm, log)
                cells.append(cell)
    wall = time.perf_counter() - started
    command = "python bench/pretraining.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    facts = "; ".join(
        f"{task}: {p['slices']} slices, {p['steps']} steps, loss {p['first_loss']:.3f} -> {p['last_loss']:.3f}, "
        f"{p['seconds'] / 60:.1f} min"
        for task, p in pretraining.items()
    )
    header = [
        f"### {args.section}",
        "",
        f"Command: `{command}`. Wall time {wall / 60:.1f} min ({args.threads} thread(s); taken while other jobs "
        "shared the 2 cores, so times are inflated).",
        f"Pre-training ({args.method}, {args.recipe}'s encoder slots, batch {args.pretrain_batch}, lr "
        f"{args.pretrain_lr:g}): {facts}.",
        f"Fine-tuning: {args.recipe}, {args.steps} steps of batch {args.batch_size}, k = {ks}, seeds {seeds}; both "
        "arms use the same exemplars, held-out slices, prompts and seeds. Dice on the held-out slices; "
        "'difference' = with - without.",
        "",
    ]
    args.runs.mkdir(parents=True, exist_ok=True)
    (args.runs / f"results-{args.section}.json").write_text(
        json.dumps(
            {
                "args": vars(args) | {"out": str(args.out), "runs": str(args.runs)},
                "wall_seconds": wall,
                "command": command,
                "pretraining": pretraining,
                "cells": cells,
            },
            indent=1,
        )  # fmt: skip
    )
    write_accuracy_section(args.out, args.section, "\n".join(header + table(cells, args.recipe)))
    print("\n".join(table(cells, args.recipe)))
    log(f"done; table in {args.out} (section {args.section})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
