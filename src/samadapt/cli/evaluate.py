"""``samadapt evaluate``: score a run (or a bare model) on a dataset, with its baseline, and write a report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from samadapt.cli.options import (
    BACKEND_HELP,
    BLEND_HELP,
    DEVICE_HELP,
    KEEP_COMPONENTS_HELP,
    LARGEST_COMPONENT_HELP,
    PRECISION_HELP,
    largest_component_classes,
)
from samadapt.components import KEEP_COMPONENTS
from samadapt.precision import PRECISIONS


def evaluate_command(args: argparse.Namespace) -> int:
    from samadapt.eval.evaluate import evaluate
    from samadapt.inference import load_predictor

    if args.prompt == "text":  # a held-out phrase per class, then the plain class name (a report each)
        for prompt, out in (("text:heldout", Path(args.out)), ("text:name", Path(args.out) / "text-name")):
            evaluate_command(argparse.Namespace(**{**vars(args), "prompt": prompt, "out": str(out)}))
        return 0
    # the one place --backend is read; evaluate scores this predictor and its baseline on the same backend
    predictor = load_predictor(
        args.run,
        args.backend,
        device=args.device,
        precision=args.precision,
        blend=args.blend,
        keep_components=args.keep_components,
    )
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
        "text:heldout | text:name (default point:1)",
    )
    evaluate.add_argument("--objects", choices=["class", "instance"], default="class")
    evaluate.add_argument("--baseline", action="store_true", help="also evaluate the un-adapted base model")
    evaluate.add_argument("--cases", nargs="*", help="only these case ids")
    evaluate.add_argument("--classes", nargs="*", type=int, help="only these class ids")
    evaluate.add_argument("--axis", type=int, default=None, help="slicing axis (default: the dataset's)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance")
    evaluate.add_argument("--out", required=True, help="report directory")
    evaluate.add_argument("--device", help=DEVICE_HELP)
    evaluate.add_argument("--precision", choices=PRECISIONS, help=PRECISION_HELP)
    evaluate.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch", help=BACKEND_HELP)
    evaluate.add_argument("--blend", type=float, help=BLEND_HELP)
    evaluate.add_argument("--keep-components", choices=KEEP_COMPONENTS, default="all", help=KEEP_COMPONENTS_HELP)
    evaluate.add_argument("--largest-component", help=LARGEST_COMPONENT_HELP)
    evaluate.set_defaults(func=evaluate_command)
