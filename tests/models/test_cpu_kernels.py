"""oneDNN's fused convolution / linear (+ GELU) kernels for CPU inference (``models.cpu_kernels``) compute the function
of the plain torch ops, are taken only for inference on the CPU, and leave autograd, FLOP counting and wrapped layers
(LoRA) on the plain path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from samadapt.models import cpu_kernels
from samadapt.precision import fast_bfloat16
from tests.models.test_tiny_vit import SLIM, reference_pair

needs_kernels = pytest.mark.skipif(not cpu_kernels._available(), reason="torch built without oneDNN")


@pytest.fixture
def plain():
    """Run a block with the fused kernels off, and turn them back on afterwards."""

    class Switch:
        def __enter__(self):
            cpu_kernels.set_fused_cpu_kernels(False)

        def __exit__(self, *exc):
            cpu_kernels.set_fused_cpu_kernels(True)

    yield Switch()
    cpu_kernels.set_fused_cpu_kernels(True)


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
        got = cpu_kernels.conv2d(x, conv.weight, conv.bias, conv, gelu)
        expected = F.conv2d(x, conv.weight, conv.bias, stride, padding, 1, groups)
        expected = F.gelu(expected) if gelu else expected
        assert fused_ops_run(lambda: cpu_kernels.conv2d(x, conv.weight, conv.bias, conv, gelu))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("gelu", [False, True])
def test_linear_is_the_plain_linear_on_strided_inputs(gelu):
    torch.manual_seed(0)
    layer = nn.Linear(20, 36)
    x = torch.randn(2, 9, 11, 20)[:, 1:8, 2:9]  # a cropped view, as the window attention's proj gets
    with torch.inference_mode():
        got = cpu_kernels.linear(x, layer, gelu)
        expected = F.gelu(layer(x)) if gelu else layer(x)
        assert fused_ops_run(lambda: cpu_kernels.linear(x, layer, gelu)) == {"mkldnn::_linear_pointwise"}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_wrapped_layers_and_autograd_keep_the_plain_path():
    class Shifted(nn.Linear):  # stands for LoRALinear: a subclass with its own forward
        def forward(self, x):
            return super().forward(x) + 1.0

    layer = Shifted(8, 8)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        assert torch.equal(cpu_kernels.linear(x, layer), layer(x))
    plain_layer = nn.Linear(8, 8)
    out = cpu_kernels.linear(x, plain_layer, gelu=True)  # autograd on: the fused ops have no backward
    out.sum().backward()
    assert plain_layer.weight.grad is not None
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):
        assert cpu_kernels.compute_dtype(x) is None  # only float32 and native bf16


@needs_kernels
def test_tiny_vit_inference_is_the_plain_function_in_float32(plain):
    ours, _ = reference_pair(128, SLIM, seed=3)  # stage 2 pads its 14 x 14 windows at this size
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        with plain:
            expected = ours(image)
        got = ours(image)
        assert {"mkldnn::_convolution_pointwise", "mkldnn::_linear_pointwise"} <= fused_ops_run(lambda: ours(image))
    assert relative(got, expected) < 1e-5
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.skipif(not fast_bfloat16("cpu"), reason="no native bf16 kernels on this CPU")
def test_tiny_vit_bf16_autocast_inference_stays_with_the_plain_bf16(plain):
    ours, _ = reference_pair(128, SLIM, seed=3)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = ours(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with plain:
                expected = ours(image)
            got = ours(image)
    assert got.dtype == expected.dtype
    # the fused GELU rounds once (after the activation) where the plain ops round twice: within bf16's error
    assert relative(got, expected) < 3e-2
    assert relative(got, full) < 5e-2 and relative(expected, full) < 5e-2


def test_flop_counting_sees_the_plain_ops(plain):
    ours, _ = reference_pair(64, SLIM, seed=3)
    image = torch.rand(1, 3, 64, 64)
    counts = []
    for switch in (plain, None):
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
    with torch.inference_mode():
        explained = torch._dynamo.explain(ours)(torch.rand(1, 3, 64, 64))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


PATHS_BF16 = ("fused", "explicit", "graph")
needs_graph = pytest.mark.skipif(not cpu_kernels.graph_attention_available(), reason="no oneDNN Graph in this torch")


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
        got = cpu_kernels.graph_attention(q, k, v, bias, 32**-0.5)
        again = cpu_kernels.graph_attention(q, k, v, bias, 32**-0.5)  # the compiled graph, from the cache
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
        cpu_kernels.graph_attention(q, k, v, bias, 0.2)
        signature = tuple((tuple(t.shape), tuple(t.stride()), t.dtype) for t in (q, k, v, bias))
        graph = cpu_kernels._attention_graph(signature, 0.2).graph_for(q, k, v, bias)
    assert "oneDNNFusionGroup" in str(graph)


@needs_graph
@pytest.mark.skipif(not fast_bfloat16("cpu"), reason="no native bf16 kernels on this CPU")
def test_graph_attention_in_bf16_is_closer_to_float32_than_the_explicit_form():
    from samadapt.models.common import biased_attention

    q, k, v, bias = _window_qkv(25, 5, 196)
    with torch.inference_mode():
        full = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=32**-0.5)
        low = [t.to(torch.bfloat16) for t in (q, k, v, bias)]
        errors = {path: relative(biased_attention(*low, 32**-0.5, path).float(), full) for path in PATHS_BF16}
    assert errors["graph"] < 1e-2 and errors["graph"] <= errors["explicit"], errors


@needs_graph
def test_graph_attention_is_fused_sdpa_where_it_must_not_run(monkeypatch):
    """Autograd, bf16 autocast and the switch off: torch's fused kernel (the graph has no backward)."""
    calls = []
    monkeypatch.setattr(cpu_kernels, "_attention_graph", lambda *a: calls.append(1))
    q, k, v, bias = _window_qkv(2, 3, 196)
    q.requires_grad_()
    out = cpu_kernels.graph_attention(q, k, v, bias, 0.2)
    out.sum().backward()
    assert q.grad is not None
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        cpu_kernels.graph_attention(q.detach(), k, v, bias, 0.2)
    cpu_kernels.set_fused_cpu_kernels(False)
    try:
        with torch.inference_mode():
            cpu_kernels.graph_attention(q.detach(), k, v, bias, 0.2)
    finally:
        cpu_kernels.set_fused_cpu_kernels(True)
    assert calls == []
