"""TinyViT's window attention, fused kernel against the explicit form: forward + backward time and error.

    python bench/attention_paths.py

For each attention stage of LiteMedSAM at 256, batch 4 (q, k, v (windows, heads, N, 32)): seconds for one forward +
backward (best of 3), and the relative error of the output and of q's gradient against float32 fused.
"""

from __future__ import annotations

import time

import torch

from samadapt.models.common import biased_attention

# (windows, heads, tokens per window) of stages 1-3 for a batch of 4 at 256
SHAPES = {"stage 1 (7x7)": (1444, 4, 49), "stage 2 (14x14)": (100, 5, 196), "stage 3 (7x7)": (400, 10, 49)}


def run(path: str, dtype: torch.dtype, shape: tuple[int, int, int]) -> tuple[float, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(*shape, 32, generator=g) * 1.5 for _ in range(3))
    bias, upstream = torch.randn(1, shape[1], shape[2], shape[2], generator=g), torch.randn(*shape, 32, generator=g)
    best = float("inf")
    for _ in range(3):
        q, k, v = (t.to(dtype).clone().requires_grad_() for t in (q0, k0, v0))
        start = time.perf_counter()
        out = biased_attention(q, k, v, bias.to(dtype), 32**-0.5, path)
        out.backward(upstream.to(dtype))
        best = min(best, time.perf_counter() - start)
    return best, [out.detach().float(), q.grad.float()]


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| stage | path | dtype | fwd + bwd (s) | output error | q-gradient error |")
    print("|---|---|---|---|---|---|")
    for stage, shape in SHAPES.items():
        _, reference = run("fused", torch.float32, shape)
        for dtype in (torch.float32, torch.bfloat16):
            for path in ("fused", "explicit"):
                seconds, got = run(path, dtype, shape)
                errors = [((a - b).norm() / b.norm()).item() for a, b in zip(got, reference, strict=True)]
                name = str(dtype).removeprefix("torch.")
                print(f"| {stage} | {path} | {name} | {seconds:.3f} | {errors[0]:.4f} | {errors[1]:.4f} |")


if __name__ == "__main__":
    main()
