"""TinyViT's window attention paths (common.biased_attention): time and error, for training or inference.

    python bench/attention_paths.py                 # forward + backward, batch 4
    python bench/attention_paths.py --inference     # forward only, no autograd, batch 1 (one 256 x 256 slice)

For each attention stage of LiteMedSAM at 256 (q, k, v (windows, heads, N, 32), as strided views of the windowed
qkv, the layout the encoder hands over): seconds (best of ``--repeats``, the paths interleaved), GFLOP/s of the
two products, and the relative error of the output (and, training, of q's gradient) against float32 fused.
Inference adds the ``graph`` path (oneDNN Graph's fused attention; CPU inference in float32 or native bf16 only,
fused elsewhere).
"""

from __future__ import annotations

import argparse
import time

import torch

from samadapt.models.common import biased_attention

# (windows, heads, tokens per window) of stages 1-3 for one 256 x 256 slice
SHAPES = {"stage 1 (7x7)": (361, 4, 49), "stage 2 (14x14)": (25, 5, 196), "stage 3 (7x7)": (100, 10, 49)}


def inputs(shape: tuple[int, int, int], batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q, k, v as the encoder passes them (views of one (windows, N, heads, 96) tensor), the bias, an upstream."""
    windows, heads, n = shape
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(batch * windows, n, heads, 96, generator=g) * 1.5).to(dtype)
    bias, upstream = torch.randn(1, heads, n, n, generator=g), torch.randn(batch * windows, heads, n, 32, generator=g)
    return qkv, bias.to(dtype), upstream.to(dtype)


def run(path: str, qkv: torch.Tensor, bias: torch.Tensor, upstream: torch.Tensor | None) -> tuple[float, list]:
    """Seconds for one call (forward + backward when ``upstream`` is given), and the output (and q's gradient)."""
    leaf = qkv.clone().requires_grad_(upstream is not None)
    q, k, v = (t.transpose(1, 2) for t in leaf.split(32, dim=3))
    start = time.perf_counter()
    out = biased_attention(q, k, v, bias, 32**-0.5, path)
    if upstream is not None:
        out.backward(upstream)
        return time.perf_counter() - start, [out.detach().float(), leaf.grad[..., :32].transpose(1, 2).float()]
    return time.perf_counter() - start, [out.float()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inference", action="store_true", help="forward only under inference_mode, batch 1")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    batch = 1 if args.inference else 4
    paths = ("fused", "explicit", "graph") if args.inference else ("fused", "explicit")
    mode = "forward (inference)" if args.inference else "fwd + bwd"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch}")
    print(
        f"| stage | path | dtype | {mode} (ms) | GFLOP/s | output error |"
        + ("" if args.inference else " q-grad error |")
    )
    print("|---|---|---|---|---|---|" + ("" if args.inference else "---|"))
    for stage, shape in SHAPES.items():
        flops = 4 * batch * shape[0] * shape[1] * shape[2] ** 2 * 32
        reference = None
        for dtype in (torch.float32, torch.bfloat16):
            qkv, bias, upstream = inputs(shape, batch, dtype)
            upstream = None if args.inference else upstream
            best, results = dict.fromkeys(paths, float("inf")), {}
            with torch.inference_mode(args.inference):
                for repeat in range(args.repeats + 1):  # the first round warms up; interleaved against drift
                    for path in paths:
                        seconds, results[path] = run(path, qkv, bias, upstream)
                        best[path] = min(best[path], seconds) if repeat else best[path]
            reference = reference or results["fused"]
            for path in paths:
                errors = [((a - b).norm() / b.norm()).item() for a, b in zip(results[path], reference, strict=True)]
                name = str(dtype).removeprefix("torch.")
                cells = [stage, path, name, f"{best[path] * 1e3:.2f}", f"{flops / best[path] / 1e9:.0f}"]
                print("| " + " | ".join(cells + [f"{e:.1e}" for e in errors]) + " |")


if __name__ == "__main__":
    main()
