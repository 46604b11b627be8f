"""torch.compile (inductor) on LiteMedSAM's image encoder, CPU inference: compile time, speed, exactness.

One process: the machine's 2048 x 2048 matmul peak, then per precision (fp32; bf16 autocast where native) and per
compile setting: the first call's time (compilation), the best of N calls after it, the achieved fraction of the
peak (67.11 GFLOP per slice, FlopCounterMode, as bench/encoder_profile.py) and the largest absolute difference of
the image embedding from eager at the same precision (and its norm-relative error). The shipped LiteMedSAM weights
and a real demo slice (falls back to noise when the demo data are not cached).

    python bench/encoder_compile.py [--repeats 5] [--modes default,freezing] [--markdown]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import matmul_peak, print_table  # noqa: E402

ENCODER_GFLOP = 67.11  # bench/encoder_profile.py's count for one 256 x 256 slice (fused attention not counted)


def demo_slice() -> torch.Tensor:
    """One real model input (a labelled demo lesion slice, 256 x 256), or noise when the demo data are not cached."""
    try:
        from samadapt.data import SliceDataset, load_dataset
        from samadapt.data.demo import fetch_demo
        from samadapt.transforms import model_input

        slices = SliceDataset(load_dataset(fetch_demo()["lesions"]))
        image = slices[slices.indices([1])[0]]["image"]
        return model_input(image, 256)[0]
    except Exception as error:  # noqa: BLE001 - any failure falls back to noise, said so
        print(f"demo slice unavailable ({type(error).__name__}); noise input")
        return torch.rand(1, 3, 256, 256)


def timed(fn, repeats: int) -> tuple[float, float]:
    """The first call's seconds and the best of ``repeats`` calls after it."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return first, best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default="default,freezing", help="compile settings to try, comma-separated")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)

    import torch._inductor.config as inductor_config

    from samadapt.models.registry import build_model
    from samadapt.precision import fast_bfloat16

    inductor_config.compile_threads = 1  # the bench runs on one pinned core; no worker pool
    with torch.inference_mode():
        image = build_model("lite_medsam").normalize(demo_slice())
    rows = []
    for precision in args.precisions.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        if dtype == torch.bfloat16 and not fast_bfloat16("cpu"):
            continue
        peak = matmul_peak(dtype)
        encoder = build_model("lite_medsam").eval().image_encoder

        def eager(encoder=encoder, dtype=dtype):
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                return encoder(image).float()

        reference = eager()
        first, best = timed(eager, args.repeats)
        rows.append(
            [precision, "eager", "", f"{best * 1e3:.0f}", f"{100 * ENCODER_GFLOP / best / peak:.1f} %", "1.00x", "", ""]
        )
        eager_best = best
        for mode in args.modes.split(","):
            torch._dynamo.reset()
            inductor_config.freezing = mode == "freezing"
            compiled_encoder = torch.compile(encoder)

            def compiled(compiled_encoder=compiled_encoder, dtype=dtype):
                with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    return compiled_encoder(image).float()

            try:
                first, best = timed(compiled, args.repeats)
            except Exception as error:  # noqa: BLE001 - a bench row, not a library path
                rows.append([precision, mode, f"failed: {type(error).__name__}: {str(error)[:80]}", "", "", "", "", ""])
                continue
            out = compiled()
            diff = (out - reference).abs().max().item()
            rel = ((out - reference).norm() / reference.norm()).item()
            rows.append([precision, mode, f"{first:.1f}", f"{best * 1e3:.0f}", f"{100 * ENCODER_GFLOP / best / peak:.1f} %",
                         f"{eager_best / best:.2f}x", f"{diff:.2e}", f"{rel:.2e}"])  # fmt: skip
        inductor_config.freezing = False
        print(f"{precision}: matmul peak {peak:.0f} GFLOP/s", flush=True)
    header = ["precision", "compile", "first call s", "best ms", "of peak", "vs eager", "max abs diff", "rel. diff"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print_table(header, rows, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
