"""``samadapt evaluate`` and ``samadapt predict``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def evaluate_command(args: argparse.Namespace) -> int:
    from samadapt.eval.evaluate import evaluate

    if args.prompt == "text":  # a held-out phrase per class, then the plain class name (a report each)
        for prompt, out in (("text:heldout", Path(args.out)), ("text:name", Path(args.out) / "text-name")):
            evaluate_command(argparse.Namespace(**{**vars(args), "prompt": prompt, "out": str(out)}))
        return 0
    metrics = evaluate(
        args.run,
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
        device=args.device,
        backend=args.backend,
    )
    print(json.dumps({"mean_dice": metrics["mean_dice"], "prompt": metrics["prompt"], "cases": metrics["cases"]}))
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def predict_command(args: argparse.Namespace) -> int:
    from samadapt.data.io import read_volume, write_label
    from samadapt.export.backend import load_for_backend
    from samadapt.predict import predict_folder, predict_volume

    if (args.image is None) == (args.input is None):
        raise ValueError("give one input: an IMAGE file, or a folder with -i/--input")
    run = load_for_backend(args.run, args.backend, device=args.device)  # load_run, or an ONNX export's run
    if args.input is not None:
        written = predict_folder(
            run, args.input, args.out, device=args.device, preprocessing=args.preprocessing, backend=args.backend
        )
        print(f"wrote {len(written)} predictions into {args.out} (existing ones kept)")
        return 0
    volume = read_volume(args.image)
    points = np.asarray(json.loads(args.points), dtype=np.float32) if args.points else None
    boxes = np.asarray(json.loads(args.boxes), dtype=np.float32) if args.boxes else None
    labels = predict_volume(
        run,
        volume,
        points=points,
        boxes=boxes,
        text=args.text,
        preprocessing=args.preprocessing,
        device=args.device,
        backend=args.backend,
    )
    path = write_label(volume, labels, args.out)
    print(f"wrote {path} ({int((labels > 0).sum())} labelled voxels)")
    return 0


_BACKEND_HELP = (
    "torch (default) or onnxruntime (fp32, CPU): --run is then an export directory (samadapt export), or a run / "
    "model exported on the fly into a temporary folder"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser("evaluate", help="score a run (or a bare model) on a dataset, with its baseline")
    evaluate.add_argument("--run", required=True, help="run directory, or a model name (e.g. lite_medsam)")
    evaluate.add_argument("--data", required=True, help="dataset directory")
    evaluate.add_argument(
        "--prompt",
        default="point:1",
        help="none | point:N | box | box:J | text (a held-out phrase per class, then the plain class name) | text:heldout | "
        "text:name (default point:1)",
    )
    evaluate.add_argument("--objects", choices=["class", "instance"], default="class")
    evaluate.add_argument("--baseline", action="store_true", help="also evaluate the un-adapted base model")
    evaluate.add_argument("--cases", nargs="*", help="only these case ids")
    evaluate.add_argument("--classes", nargs="*", type=int, help="only these class ids")
    evaluate.add_argument("--axis", type=int, default=None, help="slicing axis (default: the dataset's)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance")
    evaluate.add_argument("--out", required=True, help="report directory")
    evaluate.add_argument("--device", help="auto (default: CUDA when available), cpu, cuda or cuda:N")
    evaluate.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch", help=_BACKEND_HELP)
    evaluate.set_defaults(func=evaluate_command)
    predict = subparsers.add_parser("predict", help="segment a volume or image; writes labels on the input's grid")
    predict.add_argument("image", nargs="?", help="NIfTI / NRRD / MHA / DICOM folder / PNG")
    predict.add_argument(
        "-i", "--input", help="a folder of images (semantic runs): every case predicted, finished ones skipped"
    )
    predict.add_argument("--run", required=True, help="run directory, or a model name")
    predict.add_argument("--points", help="JSON [[x, y, z, label], ...] in voxel coordinates (label 1 fg, 0 bg)")
    predict.add_argument(
        "--boxes",
        help="JSON [[x0, y0, x1, y1, z], ...] per slice, or [[x0, y0, z0, x1, y1, z1(, class)], ...] "
        "volume boxes, one object each, propagated from their middle slice",
    )
    predict.add_argument("--text", help="a phrase naming the target (runs trained with prompt.kind=text)")
    predict.add_argument("--preprocessing", help="intensity preset (default: the run's)")
    predict.add_argument(
        "-o", "--out", required=True, help="output label file (.nii.gz, .nrrd, .mha, .png), or folder with -i"
    )
    predict.add_argument("--device", help="auto (default: CUDA when available), cpu, cuda or cuda:N")
    predict.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch", help=_BACKEND_HELP)
    predict.set_defaults(func=predict_command)
