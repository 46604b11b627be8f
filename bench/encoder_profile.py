"""Where LiteMedSAM's image encoder spends its time: per stage, in fp32 and (where the CPU has native kernels) bf16.

For each stage (patch embedding, the four TinyViT stages, the neck) of one 256 x 256 slice: its FLOPs (torch's
FlopCounterMode), its time (best of N after a warm-up), and its achieved GFLOP/s as a fraction of the machine's own
matrix-product peak measured in the same run (2048 x 2048, fp32; bf16 where native; ``measure.matmul_peak``). Run it
on an idle machine:

    python bench/encoder_profile.py [--batch 1] [--repeats 5] [--markdown]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import best_time, matmul_peak, print_table  # noqa: E402


def stage_inputs(encoder, image: torch.Tensor) -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    """Each stage with the input it receives in a real forward pass (recorded once, in fp32)."""
    stages = [("patch_embed", encoder.patch_embed)] + [(f"stage {i}", m) for i, m in enumerate(encoder.layers)]
    x = image.contiguous(memory_format=torch.channels_last)
    recorded = []
    with torch.inference_mode():
        for name, module in stages:
            recorded.append((name, module, x))
            x = module(x)
        batch, _, channels = x.shape
        neck_input = x.view(batch, encoder.grid, encoder.grid, channels).permute(0, 3, 1, 2)
        recorded.append(("neck", encoder.neck, neck_input))
    return recorded


def flops_of(module, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(x)
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)

    from samadapt.models.registry import build_model
    from samadapt.precision import fast_bfloat16

    model = build_model("lite_medsam").eval()
    encoder = model.image_encoder
    image = torch.rand(args.batch, 3, model.img_size, model.img_size)
    precisions = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if fast_bfloat16("cpu") else [])
    peaks = {name: matmul_peak(dtype) for name, dtype in precisions}
    rows = []
    for name, module, x in stage_inputs(encoder, image):
        flops = flops_of(module, x)
        cells = [name, f"{flops / 1e9:.2f}"]
        for precision, dtype in precisions:

            def call(module=module, x=x, dtype=dtype):
                with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    module(x)

            seconds = best_time(call, args.repeats)
            rate = flops / seconds / 1e9
            cells += [f"{seconds * 1000:.1f}", f"{rate:.0f} ({100 * rate / peaks[precision]:.0f} %)"]
        rows.append(cells)
    totals = ["whole encoder", f"{flops_of(encoder, image) / 1e9:.2f}"]
    for precision, dtype in precisions:

        def whole(dtype=dtype):
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                encoder(image)

        seconds = best_time(whole, args.repeats)
        rate = float(totals[1]) / seconds
        totals += [f"{seconds * 1000:.1f}", f"{rate:.0f} ({100 * rate / peaks[precision]:.0f} %)"]
    rows.append(totals)
    header = ["stage", "GFLOP"]
    for precision, _ in precisions:
        header += [f"{precision} ms", f"{precision} GFLOP/s (of peak)"]
    peak_text = ", ".join(f"{p} matmul peak {v:.0f} GFLOP/s" for p, v in peaks.items())
    print(f"batch {args.batch}; torch {torch.__version__}, {torch.get_num_threads()} threads; {peak_text}")
    print_table(header, rows, args.markdown, width=22)
    return 0


if __name__ == "__main__":
    sys.exit(main())
