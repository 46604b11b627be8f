"""LiteMedSAM's stage 0 in strips of rows (``accel.strips.mbconv``, ``accel.strips.patch_merging``) against its blocks
run whole, A / B in one process: per MBConv, per stage-0 patch merging and per encoder call (one 256 x 256 slice, the
shipped weights), float32 and bf16 autocast, interleaved rounds, best of ``--repeats`` per round and over rounds.
``--strip-mb``: strip sizes to sweep (per block).

    python bench/conv_strips.py [--repeats 5] [--rounds 3] [--precision fp32 bf16] [--strip-mb 1 2 4 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import best_time  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], nargs="*", default=["fp32", "bf16"])
    parser.add_argument("--strip-mb", type=float, nargs="*", default=[], help="strip sizes (MiB) to sweep")
    args = parser.parse_args(argv)

    from samadapt.accel import accelerate
    from samadapt.accel import strips as conv_strips
    from samadapt.models.registry import build_model
    from samadapt.precision import fast_bfloat16

    encoder = accelerate(build_model("lite_medsam").eval().image_encoder, "cpu")
    image = torch.rand(1, 3, 256, 256)
    block, merging = encoder.layers[0].blocks[0], encoder.layers[0].downsample
    precisions = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if fast_bfloat16("cpu") else [])
    precisions = [(name, dtype) for name, dtype in precisions if name in args.precision]
    default = conv_strips.STRIP_BYTES
    settings = [("whole", False, default)] + [("strips", True, default)]
    settings += [(f"strips {mb:g} MiB", True, int(mb * 2**20)) for mb in args.strip_mb]

    def timed(module, x, dtype, strips, strip_bytes):
        accelerate(module, "cpu", conv_strips=strips)
        conv_strips.STRIP_BYTES = strip_bytes

        def call():
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                module(x)

        return best_time(call, args.repeats)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load {Path('/proc/loadavg').read_text()}")
    best: dict[tuple[str, str, str], float] = {}
    for _ in range(args.rounds):
        for name, dtype in precisions:
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                # the block's input as the encoder gives it (bf16 under autocast)
                stage0 = encoder.patch_embed(image.contiguous(memory_format=torch.channels_last))
            for label, strips, strip_bytes in settings:
                for part, module, x in (
                    ("MBConv", block, stage0),
                    ("merging", merging, stage0),
                    ("encoder", encoder, image),
                ):
                    if part == "encoder" and strip_bytes != default:
                        continue
                    key = (name, part, label)
                    best[key] = min(best.get(key, float("inf")), timed(module, x, dtype, strips, strip_bytes))
    accelerate(encoder, "cpu")
    conv_strips.STRIP_BYTES = default
    for (name, part, label), seconds in best.items():
        print(f"{name} {part:8s} {label:16s} {seconds * 1e3:7.1f} ms")
    print(f"load {Path('/proc/loadavg').read_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
