"""``samadapt evaluate``: score a run (or a bare model) on a dataset, with its baseline, and write a report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from samadapt.cli.options import add_predictor_options, largest_component_classes, predictor_from


def evaluate_command(args: argparse.Namespace) -> int:
    from samadapt.eval.evaluate import evaluate

    if args.prompt == "text":  # a held-out phrase per class, then the plain class name (a report each)
        for prompt, out in (("text:heldout", Path(args.out)), ("text:name", Path(args.out) / "text-name")):
            evaluate_command(argparse.Namespace(**{**vars(args), "prompt": prompt, "out": str(out)}))
        return 0
    # the one place --backend is read; evaluate scores this predictor and its baseline on the same backend
    predictor = predictor_from(args)
    metrics = evaluate(
        predictor.run,
        args.data,
        args.prompt,
        baseline=args.baseline,
        out=args.out,
        objects_mode=args.objects,
        cases=args.cases,
        classes=args.classes,
        axis=args.axis,
        seed=args.seed,
        tolerance_mm=args.tolerance_mm,
        predictor=predictor,
        largest_component=largest_component_classes(args.largest_component),
        memory=args.propagation == "memory",
    )
    print(json.dumps({"mean_dice": metrics["mean_dice"], "prompt": metrics["prompt"], "cases": metrics["cases"]}))
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser("evaluate", help="score a run (or a bare model) on a dataset, with its baseline")
    evaluate.add_argument("--run", required=True, help="run directory, or a model name (e.g. lite_medsam)")
    evaluate.add_argument("--data", required=True, help="dataset directory")
    evaluate.add_argument(
        "--prompt",
        default="point:1",
        help="none | point:N | box | box:J | text (a held-out phrase per class, then the plain class name) | "
        "text:heldout | text:name | interactive:N (a 3D box, then N corrective clicks, default 5: the CVPR 2025 "
        "interactive protocol) (default point:1)",
    )
    evaluate.add_argument("--objects", choices=["class", "instance"], default="class")
    evaluate.add_argument("--baseline", action="store_true", help="also evaluate the un-adapted base model")
    evaluate.add_argument("--cases", nargs="*", help="only these case ids")
    evaluate.add_argument("--classes", nargs="*", type=int, help="only these class ids")
    evaluate.add_argument("--axis", type=int, default=None, help="slicing axis (default: the dataset's)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance")
    evaluate.add_argument("--out", required=True, help="report directory")
    add_predictor_options(evaluate)
    evaluate.set_defaults(func=evaluate_command)
