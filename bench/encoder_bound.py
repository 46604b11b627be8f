"""How close to the matrix-product peak can LiteMedSAM's image encoder get on this CPU? An Amdahl bound, measured.

One process: the machine's 2048 x 2048 matmul peak (fp32; bf16 where native), then, per precision, a
``torch.profiler`` trace of real encoder forwards (the shipped LiteMedSAM weights, one 256 x 256 slice) with each
op's self time put in a category: matrix products (linear / addmm / mm / bmm, dense convolutions), fused window
attention (matrix products with a softmax between), and the ops that cannot use the dot-product units (depthwise
convolution, GELU, LayerNorm, add / mul, copies and casts, ...). FLOPs per category come from FlopCounterMode
(depthwise convolutions are told apart by their module).

Bound: if every matrix-product op ran at the peak and everything else took its measured time, the encoder would
take ``F_mm / peak + T_other`` and reach ``F_total / (F_mm + T_other * peak)`` of the peak. Fused attention is
counted on the matrix-product side (the optimistic bound) and, in a second figure, on the other side.

    python bench/encoder_bound.py [--repeats 5] [--markdown]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import best_time, matmul_peaks  # noqa: E402

CONV_OPS = {"aten::mkldnn_convolution", "aten::_convolution", "aten::convolution", "aten::conv2d",
            "aten::_conv_depthwise2d", "aten::thnn_conv2d", "aten::_slow_conv2d_forward",
            "aten::convolution_overrideable", "mkldnn::_convolution_pointwise"}  # fmt: skip
MATMUL_OPS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
              "mkldnn::_linear_pointwise", "aten::_addmm_activation"}  # fmt: skip
# "forward": the TorchScript call of accel.attention.graph_attention (oneDNN Graph's fused attention runs in its self time)
ATTENTION_OPS = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
                 "aten::_scaled_dot_product_attention_math", "forward"}  # fmt: skip
NAMED = {
    "gelu": "GELU",
    "index_select": "other",
    "layer_norm": "LayerNorm",
    "native_layer_norm": "LayerNorm",
    "_softmax": "softmax",
    "softmax": "softmax",
    "add": "add / mul / rsqrt",
    "mul": "add / mul / rsqrt",
    "sub": "add / mul / rsqrt",
    "rsqrt": "add / mul / rsqrt",
    "copy": "copies / padding / cat",
    "_to_copy": "copies / padding / cat",
    "clone": "copies / padding / cat",
    "contiguous": "copies / padding / cat",
    "cat": "copies / padding / cat",
    "constant_pad_nd": "copies / padding / cat",
    "fill_": "copies / padding / cat",
    "zero_": "copies / padding / cat",
    "empty": "allocation",
    "empty_strided": "allocation",
}
CAST = "dtype casts (autocast)"
MATRIX = ("matrix products (linear, dense conv)", "window attention (its matmuls, or the fused kernel)")


def category(name: str, shapes: list) -> str:
    """The category of one op from its name and (for convolutions) its weight's shape."""
    if name in CONV_OPS:
        weight = shapes[1] if len(shapes) > 1 else []
        return "depthwise conv" if len(weight) == 4 and weight[1] == 1 and weight[0] > 1 else MATRIX[0]
    if name in MATMUL_OPS:
        return MATRIX[0]
    if name in ATTENTION_OPS:
        return MATRIX[1]
    if name.startswith("aten::"):
        short = name[len("aten::") :].rstrip("_") if name != "aten::fill_" else "fill_"
        if short in NAMED or name[len("aten::") :] in NAMED:
            return NAMED.get(name[len("aten::") :], NAMED.get(short))
        if short in ("view", "permute", "reshape", "as_strided", "transpose", "unsqueeze", "expand", "slice", "t"):
            return "views (no data moved)"
    return "other"


def flops_by_category(encoder, image: torch.Tensor) -> dict[str, float]:
    """FLOPs of the dense matrix products, the depthwise convolutions and the window attention of one forward.

    FlopCounterMode does not count the fused CPU attention kernel, so the attention's two matrix products are counted
    on the explicit path (same products); depthwise convolutions are those of modules with grouped convolutions.
    """
    from torch.utils.flop_counter import FlopCounterMode

    depthwise = {name for name, m in encoder.named_modules() if hasattr(m, "c") and m.c.groups > 1}
    attention = {name for name, m in encoder.named_modules() if name.endswith(".attn")}
    encoder.set_attention_path("explicit")
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            encoder(image)
    finally:
        encoder.set_attention_path("auto")
    counts = {name.split(".", 1)[-1]: ops for name, ops in counter.get_flop_counts().items()}
    total = float(sum(counts["Global"].values()))
    dw = sum(float(sum(counts[name].values())) for name in depthwise if name in counts)
    # the attention module's own bmm, less those of its linears (qkv / proj on a strided grid also run as bmm)
    bmm = {name: float(ops.get(torch.ops.aten.bmm, 0)) for name, ops in counts.items()}
    attn = sum(bmm.get(name, 0) - bmm.get(f"{name}.qkv", 0) - bmm.get(f"{name}.proj", 0) for name in attention)
    return {"total": total, "depthwise conv": dw, MATRIX[1]: attn, MATRIX[0]: total - dw - attn}


def attributed_category(event) -> str:
    """An op's category, or that of the matrix-product op it runs inside (the bias copy of a float32 ``addmm``, the
    bias of a slow 1x1 convolution); autocast's dtype casts stay casts wherever they run. A bare ``matmul`` (not
    inside a linear) is the explicit window attention's (``common.biased_attention``), TinyViT's only one."""
    nodes, node = [], event
    while node is not None:
        if node.name in ("aten::_to_copy", "aten::to"):
            return CAST
        nodes.append(node)
        node = node.cpu_parent
    names = {n.name for n in nodes}
    if "aten::matmul" in names and not names & {"aten::linear", "mkldnn::_linear_pointwise"}:
        return MATRIX[1]
    for n in nodes:
        kind = category(n.name, n.input_shapes)
        if kind in MATRIX or kind == "depthwise conv":
            return kind
    return category(event.name, event.input_shapes)


def profile_by_category(call, repeats: int) -> tuple[dict[str, float], float]:
    """Self CPU seconds per category for one forward (mean over ``repeats`` profiled calls) and their sum."""
    from torch.profiler import ProfilerActivity, profile

    call()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(repeats):
            call()
    seconds: dict[str, float] = defaultdict(float)
    for event in prof.events():
        seconds[attributed_category(event)] += event.self_cpu_time_total / 1e6 / repeats
    return dict(seconds), sum(seconds.values())


def encoder_call(encoder, image: torch.Tensor, dtype: torch.dtype):
    def call() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            encoder(image)

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--kernels", default="plain,fused", help="plain (torch's ops), fused (samadapt.accel's cpu target) or both"
    )
    args = parser.parse_args(argv)

    from samadapt.models.registry import build_model
    from samadapt.precision import fast_bfloat16

    encoder = build_model("lite_medsam").eval().image_encoder
    image = torch.rand(1, 3, 256, 256)
    precisions = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if fast_bfloat16("cpu") else [])
    flops = flops_by_category(encoder, image)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; encoder {flops['total'] / 1e9:.2f} GFLOP "
          f"(dense matrix products {flops[MATRIX[0]] / 1e9:.2f}, attention {flops[MATRIX[1]] / 1e9:.2f}, "
          f"depthwise {flops['depthwise conv'] / 1e9:.2f})")  # fmt: skip
    from samadapt.accel import accelerate, reference

    for (precision, dtype), kernels in itertools.product(precisions, args.kernels.split(",")):
        if kernels == "fused":
            accelerate(encoder, "cpu")
        else:
            reference(encoder)
        name = f"{precision}, {kernels} kernels"
        peaks = matmul_peaks(dtype)
        peak = max(peaks.values()) * 1e9
        call = encoder_call(encoder, image, dtype)
        wall = best_time(call, args.repeats)
        seconds, profiled = profile_by_category(call, args.repeats)
        # the profiler's own cost per op inflates every category alike: scale them to the unprofiled time
        scale = wall / profiled
        rows = sorted(seconds.items(), key=lambda kv: -kv[1])
        peak_text = ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
        print(f"\n{name}: matmul peak {peak / 1e9:.0f} GFLOP/s ({peak_text}); encoder {wall * 1e3:.1f} ms (best of {args.repeats}); "
              f"profiled sum {profiled * 1e3:.1f} ms (mean of {args.repeats}; the table is scaled to the best)")  # fmt: skip
        table = [("category", "ms", "share", "GFLOP", "GFLOP/s (of peak)")]
        for key, value in rows:
            f = flops.get(key, 0.0)
            rate = f"{f / value / 1e9:.0f} ({100 * f / value / peak:.0f} %)" if f else ""
            table.append((key, f"{value * scale * 1e3:.1f}", f"{100 * value / profiled:.1f} %", f"{f / 1e9:.2f}", rate))
        if args.markdown:
            print("| " + " | ".join(table[0]) + " |\n|" + "---|" * len(table[0]))
            for row in table[1:]:
                print("| " + " | ".join(row) + " |")
        else:
            for row in table:
                print(f"{row[0]:>38s} {row[1]:>9s} {row[2]:>8s} {row[3]:>7s} {row[4]:>18s}")
        counted = flops["total"] - flops[MATRIX[1]]  # the earlier tables' FLOPs: FlopCounterMode skips fused attention
        print(
            f"  achieved: {100 * counted / wall / peak:.1f} % of peak counting {counted / 1e9:.2f} GFLOP (as "
            f"encoder_profile.py), {100 * flops['total'] / wall / peak:.1f} % counting the attention's too"
        )
        for matrix_side in (MATRIX, MATRIX[:1]):
            f_mm = sum(flops[k] for k in matrix_side)
            t_other = scale * sum(v for k, v in seconds.items() if k not in matrix_side)
            t_mm = scale * sum(seconds.get(k, 0.0) for k in matrix_side)
            label = "matrix products + attention" if len(matrix_side) == 2 else "matrix products only"
            bound_time = f_mm / peak + t_other
            print(f"  bound ({label} at peak, rest as measured: {t_other * 1e3:.1f} ms): encoder "
                  f"{bound_time * 1e3:.1f} ms, {100 * counted / bound_time / peak:.1f} % of peak "
                  f"({100 * flops['total'] / bound_time / peak:.1f} % with attention FLOPs); those ops now run at "
                  f"{f_mm / t_mm / 1e9:.0f} GFLOP/s ({100 * f_mm / t_mm / peak:.0f} %)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
