"""oneDNN's fused convolution / linear (+ GELU) kernels for CPU inference (``accel.kernels``, swapped in by
``accel.accelerate(model, "cpu")``) compute the function of the plain torch ops, are taken only for inference on the
CPU, and leave autograd, FLOP counting and wrapped layers (LoRA) on the plain path. So does the MBConv run in strips
of rows (``accel.strips.mbconv``)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from samadapt import accel
from samadapt.accel import accelerate, attention, kernels
from samadapt.accel import strips as conv_strips
from samadapt.models.tiny_vit import MBConv, PatchMerging
from samadapt.precision import fast_bfloat16
from tests.models.test_tiny_vit import SLIM, reference_pair

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="torch built without oneDNN")


@contextmanager
def plain(module: nn.Module):
    """``with`` it, ``module`` runs its reference classes (no fused kernels); accelerated again afterwards."""
    accel.reference(module)
    try:
        yield
    finally:
        accelerate(module)


@contextmanager
def untiled(module: nn.Module):
    """``with`` it, ``module`` runs accelerated with the convolution strips off; with them on afterwards."""
    accelerate(module, conv_strips=False)
    try:
        yield
    finally:
        accelerate(module)


class Strips(list):
    def __init__(self) -> None:
        super().__init__()
        self.merging: list[tuple[int, int]] = []


@pytest.fixture
def strips(monkeypatch):
    """The output rows (top, bottom) of every strip ``accel.strips.mbconv`` computes, in order; ``strips.merging``:
    those of ``accel.strips.patch_merging``. Blocks of any size run in strips (the test blocks are small)."""
    monkeypatch.setattr(conv_strips, "WHOLE_BYTES", 0)
    calls = Strips()
    compute = conv_strips._strip

    def counted(x, top, bottom, expand, depthwise, project, stride, residual, ops):
        (calls if residual else calls.merging).append((top, bottom))
        return compute(x, top, bottom, expand, depthwise, project, stride, residual, ops)

    monkeypatch.setattr(conv_strips, "_strip", counted)
    return calls


def fused_ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events() if event.name.startswith("mkldnn::_")}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@needs_kernels
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("kernel, stride, padding, groups", [(1, 1, 0, 1), (3, 2, 1, 12), (3, 1, 1, 1)])
def test_conv2d_is_the_plain_convolution_in_float32(gelu, kernel, stride, padding, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 24, kernel, stride, padding, groups=groups)
    x = torch.randn(2, 12, 15, 13).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = kernels.conv2d(x, conv.weight, conv.bias, conv, gelu)
        expected = F.conv2d(x, conv.weight, conv.bias, stride, padding, 1, groups)
        expected = F.gelu(expected) if gelu else expected
        assert fused_ops_run(lambda: kernels.conv2d(x, conv.weight, conv.bias, conv, gelu))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("gelu", [False, True])
def test_linear_is_the_plain_linear_on_strided_inputs(gelu):
    torch.manual_seed(0)
    layer = nn.Linear(20, 36)
    x = torch.randn(2, 9, 11, 20)[:, 1:8, 2:9]  # a cropped view, as the window attention's proj gets
    with torch.inference_mode():
        got = kernels.linear(x, layer, gelu)
        expected = F.gelu(layer(x)) if gelu else layer(x)
        assert fused_ops_run(lambda: kernels.linear(x, layer, gelu)) == {"mkldnn::_linear_pointwise"}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_wrapped_layers_and_autograd_keep_the_plain_path():
    class Shifted(nn.Linear):  # stands for LoRALinear: a subclass with its own forward
        def forward(self, x):
            return super().forward(x) + 1.0

    layer = Shifted(8, 8)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        assert torch.equal(kernels.linear(x, layer), layer(x))
    plain_layer = nn.Linear(8, 8)
    out = kernels.linear(x, plain_layer, gelu=True)  # autograd on: the fused ops have no backward
    out.sum().backward()
    assert plain_layer.weight.grad is not None
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):
        assert kernels.compute_dtype(x) is None  # only float32 and native bf16


@needs_kernels
def test_tiny_vit_inference_is_the_plain_function_in_float32():
    ours, _ = reference_pair(128, SLIM, seed=3)  # stage 2 pads its 14 x 14 windows at this size
    accelerate(ours)
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        with plain(ours):
            expected = ours(image)
        got = ours(image)
        assert {"mkldnn::_convolution_pointwise", "mkldnn::_linear_pointwise"} <= fused_ops_run(lambda: ours(image))
    assert relative(got, expected) < 1e-5
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.skipif(not fast_bfloat16("cpu"), reason="no native bf16 kernels on this CPU")
def test_tiny_vit_bf16_autocast_inference_stays_with_the_plain_bf16():
    ours, _ = reference_pair(128, SLIM, seed=3)
    accelerate(ours)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = ours(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with plain(ours):
                expected = ours(image)
            got = ours(image)
    assert got.dtype == expected.dtype
    # the fused GELU rounds once (after the activation) where the plain ops round twice: within bf16's error
    assert relative(got, expected) < 3e-2
    assert relative(got, full) < 5e-2 and relative(expected, full) < 5e-2


def test_flop_counting_sees_the_plain_ops():
    ours, _ = reference_pair(64, SLIM, seed=3)
    accelerate(ours)
    image = torch.rand(1, 3, 64, 64)
    counts = []
    for switch in (plain(ours), None):
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            if switch is None:
                ours(image)
            else:
                with switch:
                    ours(image)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_torch_compile_traces_the_encoder_in_one_graph():
    ours, _ = reference_pair(64, SLIM, seed=3)
    accelerate(ours)  # the kernels' checks see torch.compile first: no graph break
    with torch.inference_mode():
        explained = torch._dynamo.explain(ours)(torch.rand(1, 3, 64, 64))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def with_statistics(block: nn.Module, seed: int = 0) -> nn.Module:
    """``block`` in eval mode with random weights and batch-norm affine maps and statistics (MBConv's
    zero-initialised last one would make the block GELU(x), blind to the depthwise convolution's halo),
    accelerated."""
    torch.manual_seed(seed)
    block.eval()
    with torch.no_grad():
        for conv in (block.conv1, block.conv2, block.conv3):
            conv.c.weight.normal_(std=0.5)
            conv.bn.weight.uniform_(0.5, 1.5)
            conv.bn.bias.normal_()
            conv.bn.running_mean.normal_()
            conv.bn.running_var.uniform_(0.5, 2.0)
    return accelerate(block)


def mbconv_with_statistics(dim: int = 8, seed: int = 0) -> MBConv:
    return with_statistics(MBConv(dim, 4.0), seed)


def channels_last(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).contiguous(
        memory_format=torch.channels_last
    )


@needs_kernels
@pytest.mark.parametrize("rows", [1, 4, 5, 13, 20])
def test_tiled_mbconv_is_the_whole_block_in_float32(rows, monkeypatch, strips):
    block = mbconv_with_statistics()
    x = channels_last(3, 8, 13, 11)  # 13 rows: strips of 4 and 5 leave a shorter last one; 13 and 20 are one strip
    monkeypatch.setattr(conv_strips, "STRIP_BYTES", rows * 11 * 32 * 4)  # hidden 32 channels of float32, 11 wide
    with torch.inference_mode():
        with plain(block):
            expected = block(x)
        with untiled(block):
            whole = block(x)
        assert not strips
        got = block(x)
    tops = list(range(0, 13, rows))
    assert strips == [(top, min(top + rows, 13)) for top in tops] * 3  # each image of the batch, top to bottom
    assert got.is_contiguous(memory_format=torch.channels_last)
    for reference in (expected, whole):
        assert relative(got, reference) < 1e-5
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
        # the border rows and columns, where the depthwise convolution pads, and the rows around each strip's edge
        edges = sorted({0, 12} | {t for t in tops} | {max(t - 1, 0) for t in tops})
        torch.testing.assert_close(got[:, :, edges], reference[:, :, edges], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[..., [0, 10]], reference[..., [0, 10]], rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("kind", ["mbconv", "merging"])
def test_switches_training_autograd_small_and_other_inputs_keep_the_whole_blocks(kind, monkeypatch, strips):
    block = mbconv_with_statistics() if kind == "mbconv" else with_statistics(PatchMerging((9, 7), 8, 12, 2))
    calls = strips if kind == "mbconv" else strips.merging
    x = channels_last(2, 8, 9, 7)
    with torch.inference_mode():
        with untiled(block):
            block(x)
        with plain(block):
            block(x)
        block(x.contiguous())  # not channels-last: its strips of rows would not be contiguous
        with torch.autocast("cpu", dtype=torch.float16):
            block(x)  # float32 and native bf16 only (compute_dtype)
    block(x).sum().backward()  # autograd: the fused ops have no backward
    assert block.conv1.c.weight.grad is not None
    block.conv2.bn.train()  # batch statistics: nothing to fold
    with torch.inference_mode():
        block(x)
    block.eval()
    monkeypatch.setattr(conv_strips, "WHOLE_BYTES", 2 * 9 * 7 * 32 * 4)  # more than this block's hidden activation
    with torch.inference_mode():
        block(x)
    assert not strips and not strips.merging
    monkeypatch.setattr(conv_strips, "WHOLE_BYTES", 9 * 7 * 12 * 4 - 1)  # less than either's (12: merging's hidden)
    with torch.inference_mode():
        block(x)
    rows = 9 if kind == "mbconv" else 5
    assert calls == [(0, rows), (0, rows)]  # on by default: one strip per image at this size


@needs_kernels
@pytest.mark.skipif(not fast_bfloat16("cpu"), reason="no native bf16 kernels on this CPU")
@pytest.mark.parametrize("stream", [torch.float32, torch.bfloat16])
def test_tiled_mbconv_under_bf16_autocast_stays_with_the_whole_block(stream, monkeypatch, strips):
    block = mbconv_with_statistics()
    x = channels_last(2, 8, 13, 11).to(stream)  # the encoder's stage 0 gets bf16 under autocast, a lone block float32
    monkeypatch.setattr(conv_strips, "STRIP_BYTES", 4 * 11 * 32 * 2)  # 4 rows of bf16
    with torch.inference_mode():
        with untiled(block):
            full = block(x.float())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                whole = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = block(x)
    assert strips == [(0, 4), (4, 8), (8, 12), (12, 13)] * 2
    assert got.dtype == whole.dtype == stream
    # both round the same bf16 products; the tiled GELU rounds once where aten's rounds the bf16 stream's twice
    assert relative(got, whole) < 1e-2
    assert relative(got, full) < 1.5 * relative(whole, full) + 1e-3


@needs_kernels
def test_tiny_vit_with_strips_is_the_plain_function_in_float32(monkeypatch, strips):
    ours, _ = reference_pair(128, SLIM, seed=3)
    accelerate(ours)
    for block in ours.layers[0].blocks:  # random statistics: the zero-initialised last batch norm hides the halo
        with torch.no_grad():
            block.conv3.bn.weight.uniform_(0.5, 1.5)
            block.conv3.bn.running_var.uniform_(0.5, 2.0)
    monkeypatch.setattr(conv_strips, "STRIP_BYTES", 24 * 128 * 64 * 4)  # 24 of 128 rows: the last strip has 8
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        with plain(ours):
            expected = ours(image)
        with untiled(ours):
            whole = ours(image)
        got = ours(image)
    assert len(strips) == 2 * 6 * len(ours.layers[0].blocks)
    assert strips.merging[:3] == [(0, 24), (24, 48), (48, 64)]  # stage 0's: 24 of its 64 output rows of 32 channels
    assert relative(got, expected) < 1e-5 and relative(got, whole) < 1e-5
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("stride", [2, 1])
@pytest.mark.parametrize("rows", [1, 3, 7])
@pytest.mark.parametrize("tokens", [False, True])
def test_patch_merging_in_strips_is_the_whole_block_in_float32(stride, rows, tokens, monkeypatch, strips):
    merging = with_statistics(PatchMerging((13, 11), 8, 12, stride))
    x = channels_last(3, 8, 13, 11)  # odd sizes: the bottom row and right column of stride 2 read the padding
    if tokens:  # as the later stages hand it over: (B, H * W, C)
        x = x.permute(0, 2, 3, 1).reshape(3, 13 * 11, 8)
    monkeypatch.setattr(conv_strips, "STRIP_BYTES", rows * stride * 11 * 12 * 4)  # output rows of 12 channels
    with torch.inference_mode():
        with plain(merging):
            expected = merging(x)
        with untiled(merging):
            whole = merging(x)
        assert not strips.merging
        got = merging(x)
    height = 7 if stride == 2 else 13
    assert strips.merging == [(top, min(top + rows, height)) for top in range(0, height, rows)] * 3
    assert got.shape == expected.shape == (3, height * (6 if stride == 2 else 11), 12)
    for reference in (expected, whole):
        assert relative(got, reference) < 1e-5
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.skipif(not fast_bfloat16("cpu"), reason="no native bf16 kernels on this CPU")
def test_patch_merging_in_strips_under_bf16_autocast_is_the_whole_block(monkeypatch, strips):
    merging = with_statistics(PatchMerging((13, 11), 8, 12, 2))
    x = channels_last(2, 8, 13, 11).to(torch.bfloat16)
    monkeypatch.setattr(conv_strips, "STRIP_BYTES", 3 * 2 * 11 * 12 * 2)  # 3 output rows of bf16
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        with untiled(merging):
            whole = merging(x)
        got = merging(x)
    assert strips.merging == [(0, 3), (3, 6), (6, 7)] * 2
    assert got.dtype == whole.dtype == torch.bfloat16
    assert relative(got, whole) < 1e-3  # the same bf16 kernels, row by row (equal on the CPU they were written on)


PATHS_BF16 = ("fused", "explicit", "graph")
needs_graph = pytest.mark.skipif(not attention.graph_attention_available(), reason="no oneDNN Graph in this torch")


def _window_qkv(windows: int, heads: int, tokens: int) -> tuple[torch.Tensor, ...]:
    """q, k, v as TinyViT passes them (strided views of one windowed qkv) and a learned-bias-like mask."""
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(windows, tokens, heads, 96, generator=g) * 1.5
    q, k, v = (t.transpose(1, 2) for t in qkv.split(32, dim=3))
    return q, k, v, torch.randn(1, heads, tokens, tokens, generator=g)


@needs_graph
@pytest.mark.parametrize("shape", [(361, 4, 49), (25, 5, 196), (100, 10, 49), (2, 3, 196)])
def test_graph_attention_is_the_fused_function(shape):
    """LiteMedSAM's three stages at 256, one slice (windows, heads, tokens), and a small 14 x 14 case."""
    q, k, v, bias = _window_qkv(*shape)
    was_enabled = torch._C._jit_llga_enabled()
    with torch.inference_mode():
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=32**-0.5)
        got = attention.graph_attention(q, k, v, bias, 32**-0.5)
        again = attention.graph_attention(q, k, v, bias, 32**-0.5)  # the compiled graph, from the cache
    assert torch._C._jit_llga_enabled() == was_enabled  # the process-wide fusion switch is left as it was
    assert relative(got, expected) < 1e-5 and torch.equal(got, again)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_graph
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_attention_runs_one_fused_onednn_partition(dtype):
    if dtype == torch.bfloat16 and not fast_bfloat16("cpu"):
        pytest.skip("no native bf16 kernels on this CPU")
    q, k, v, bias = (t.to(dtype) for t in _window_qkv(2, 3, 196))
    with torch.inference_mode():
        attention.graph_attention(q, k, v, bias, 0.2)
        signature = tuple((tuple(t.shape), tuple(t.stride()), t.dtype) for t in (q, k, v, bias))
        graph = attention._attention_graph(signature, 0.2).graph_for(q, k, v, bias)
    assert "oneDNNFusionGroup" in str(graph)


@needs_graph
@pytest.mark.skipif(not fast_bfloat16("cpu"), reason="no native bf16 kernels on this CPU")
def test_graph_attention_in_bf16_is_closer_to_float32_than_the_explicit_form():
    from samadapt.accel.attention import biased_attention

    q, k, v, bias = _window_qkv(25, 5, 196)
    with torch.inference_mode():
        full = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=32**-0.5)
        low = [t.to(torch.bfloat16) for t in (q, k, v, bias)]
        errors = {path: relative(biased_attention(*low, 32**-0.5, path).float(), full) for path in PATHS_BF16}
    assert errors["graph"] < 1e-2 and errors["graph"] <= errors["explicit"], errors


@needs_graph
def test_graph_attention_is_fused_sdpa_where_it_must_not_run(monkeypatch):
    """Autograd, bf16 autocast and a model not accelerated: torch's fused kernel (the graph has no backward)."""
    calls = []
    monkeypatch.setattr(attention, "_attention_graph", lambda *a: calls.append(1))
    q, k, v, bias = _window_qkv(2, 3, 196)
    q.requires_grad_()
    out = attention.graph_attention(q, k, v, bias, 0.2)
    out.sum().backward()
    assert q.grad is not None
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        attention.graph_attention(q.detach(), k, v, bias, 0.2)
    ours, _ = reference_pair(64, SLIM, seed=3)  # stage 2's 14 x 14 windows: 196 tokens
    with torch.inference_mode():
        ours(torch.rand(1, 3, 64, 64))
    assert calls == []


@needs_graph
def test_a_failed_graph_compile_warns_once_and_leaves_the_fused_kernel(monkeypatch):
    """A torch whose deprecated LLGA bridge breaks must not break inference: fused SDPA, one warning, no retries."""
    from samadapt.accel.attention import biased_attention

    tries = []

    def broken(examples, scale):
        tries.append(1)
        raise RuntimeError("LLGA bridge gone")

    monkeypatch.setattr(attention, "_compile_attention", broken)
    monkeypatch.setattr(attention, "_graph_failed", False)
    attention._attention_graph.cache_clear()
    q, k, v, bias = _window_qkv(2, 3, 196)
    with torch.inference_mode():
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.2)
        with pytest.warns(RuntimeWarning, match="LLGA bridge gone"):
            got = biased_attention(q, k, v, bias, 0.2, "auto")
        again = biased_attention(q, k, v, bias, 0.2, "auto")  # auto no longer picks the graph: no second try
    attention._attention_graph.cache_clear()
    assert torch.equal(got, expected) and torch.equal(again, expected) and tries == [1]
    assert not attention.graph_attention_available()
