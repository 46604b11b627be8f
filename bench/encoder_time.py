"""LiteMedSAM's image encoder, one 256 x 256 slice: time per call, system time and page faults, for A / B runs of
process-level settings (allocator environment variables, threads) and of the library's switches.

Run it once per setting, each in a fresh process, e.g.:

    python bench/encoder_time.py
    THP_MEM_ALLOC_ENABLE=1 python bench/encoder_time.py
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 python bench/encoder_time.py
    python bench/encoder_time.py --kernels plain --attention fused
    python bench/encoder_time.py --strips off
    python bench/encoder_time.py --windows reshape
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--kernels", choices=["fused", "plain"], default="fused", help="accel.accelerate(encoder, 'cpu') or not"
    )
    parser.add_argument("--strips", choices=["on", "off"], default="on", help="accelerate(..., conv_strips=)")
    parser.add_argument("--attention", choices=["auto", "fused", "explicit", "graph"], default="auto")
    parser.add_argument(
        "--windows", choices=["copy", "reshape"], default="copy", help="accelerate(..., window_copies=)"
    )
    args = parser.parse_args(argv)

    from samadapt.accel import accelerate
    from samadapt.models.registry import build_model
    from samadapt.precision import fast_bfloat16

    encoder = build_model("lite_medsam").eval().image_encoder
    if args.kernels == "fused":
        accelerate(encoder, "cpu", conv_strips=args.strips == "on", window_copies=args.windows == "copy")
    encoder.set_attention_path(args.attention)
    image = torch.rand(1, 3, 256, 256)
    precisions = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if fast_bfloat16("cpu") else [])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; kernels {args.kernels}, strips {args.strips}, "
        f"attention {args.attention}, windows {args.windows}"
    )
    for name, dtype in precisions:

        def call(dtype=dtype):
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                encoder(image)

        call()
        times, before = [], resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(args.repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        system = (after.ru_stime - before.ru_stime) / args.repeats
        faults = (after.ru_minflt - before.ru_minflt) / args.repeats
        print(
            f"{name}: best {min(times) * 1e3:.0f} ms, median {sorted(times)[len(times) // 2] * 1e3:.0f} ms; "
            f"system time {system * 1e3:.0f} ms and {faults:.0f} page faults per call"
        )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
