"""``samadapt export``: a run (or a bare model) as ONNX graphs plus a manifest, for onnxruntime-only deployment."""

from __future__ import annotations

import argparse
import json

from samadapt.cli.options import BLEND_HELP, DEVICE_HELP
from samadapt.errors import ConfigError


def export_command(args: argparse.Namespace) -> int:
    from samadapt.export.onnx import export_onnx

    if args.format != "onnx":
        raise ConfigError(f"unknown export format {args.format!r}: onnx")
    manifest = export_onnx(
        args.run, args.out, drop_depth=args.drop_depth, opset=args.opset, device=args.device, blend=args.blend
    )
    summary = {key: manifest[key] for key in ("task", "img_size", "base_model", "opset")}
    print(json.dumps({**summary, "notes": manifest["notes"], "out": str(args.out)}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export", help="write a run (or a bare model) as ONNX graphs + manifest, runnable with onnxruntime alone"
    )
    export.add_argument("--run", required=True, help="run directory, or a model name (e.g. lite_medsam)")
    export.add_argument("--device", help="where the run is loaded: " + DEVICE_HELP)
    export.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default onnx)")
    export.add_argument("--out", required=True, help="output folder (image_encoder.onnx, decoder.onnx, manifest.json)")
    export.add_argument(
        "--drop-depth",
        action="store_true",
        help="export a run with MSA's 3D depth branch without it (the graphs encode slices one at a time, where the "
        "branch adds nothing); without this flag such a run is refused",
    )
    export.add_argument("--blend", type=float, help=BLEND_HELP)
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    export.set_defaults(func=export_command)
