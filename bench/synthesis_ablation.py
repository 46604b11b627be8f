"""Cheap Lunch ablation on the real lesion data: the same exemplars, trained with and without synthesised slices.

    python bench/synthesis_ablation.py [--steps 45] [--lr 2e-3] [--exemplars 6] [--synthetic 120] [--out runs/ablation]

Held-out slices are the labelled slices more than one slice away from every exemplar (as in the demo); both runs use
the same seed, steps and prompts (one centre click per lesion), and the numbers are written to OUT/ablation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from samadapt.data.datasets import SliceDataset, load_dataset
from samadapt.data.demo import fetch_demo
from samadapt.data.synthesis import SynthesisConfig, background_slices, synthesize
from samadapt.demo import held_out, recipe_config, spread
from samadapt.eval.evaluate import evaluate_slices
from samadapt.runs import load_run
from samadapt.train.api import fit_slices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--lr", type=float, default=2e-3, help="as in the demo")
    parser.add_argument("--exemplars", type=int, default=6)
    parser.add_argument("--synthetic", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    args = parser.parse_args(argv)
    slices = SliceDataset(load_dataset(fetch_demo()["lesions"]))
    labelled = slices.indices([1])
    rng = np.random.default_rng(args.seed)
    exemplars = sorted(rng.choice(labelled, size=args.exemplars, replace=False).tolist())
    test_items = [slices[i] for i in held_out(slices, labelled, exemplars, gap=1)]
    exemplar_items = [slices[i] for i in exemplars]
    with_lesion = set(labelled)
    empty = [i for i in slices.indices(None) if i not in with_lesion]
    base_items = exemplar_items + [slices[i] for i in spread(empty, max(1, len(exemplars) // 2))]
    # backgrounds from the exemplars' own cases, so a lesion is not pasted into another modality
    cases = sorted({it["case"] for it in exemplar_items})
    backgrounds = [slices[i]["image"] for i in background_slices(slices, [1], cases=cases, limit=200, seed=args.seed)]
    synthetic = synthesize(exemplar_items, backgrounds, args.synthetic, SynthesisConfig(), seed=args.seed, classes=[1])
    results = {}
    for name, items in (("exemplars only", base_items), ("exemplars + synthesis", base_items + synthetic)):
        config = recipe_config("cheap-lunch", args.steps, 2, args.seed, lr=args.lr)
        run_dir = args.out / name.replace(" ", "_").replace("+", "plus")
        fit_slices(config, items, [], {1: "lesion"}, run_dir, "percentile_slice", verbose=False)
        evaluation = evaluate_slices(
            load_run(run_dir, checkpoint="last"), test_items, {1: "lesion"}, "point:1", seed=args.seed
        )
        results[name] = evaluation.summary["mean_dice"]
        print(f"{name}: point:1 Dice {results[name]:.3f} on {len(test_items)} held-out slices", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(
        json.dumps(
            {
                "dice_point1": results,
                "steps": args.steps,
                "lr": args.lr,
                "exemplars": [slices.slices[i][:2] for i in exemplars],
                "synthetic": args.synthetic,
                "held_out": len(test_items),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
