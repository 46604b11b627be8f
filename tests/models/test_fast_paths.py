"""Inference fast paths (issue 14) compute the same function as the plain formulas they replace: LayerNorm2d as a
fused layer norm, the decoder's stride-2 transposed convolutions as matrix products, the cached dense positional
encoding, grey slices resampled as one plane (torch and numpy), the numpy two-tap bilinear resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from samadapt.accel import accelerate, kernels
from samadapt.export.geometry import _linear_weights, resize
from samadapt.export.geometry import model_input as numpy_model_input
from samadapt.models.common import LayerNorm2d
from samadapt.models.mask_decoder import _conv_transpose_as_matmul, _is_block_conv_transpose
from samadapt.models.prompt_encoder import PromptEncoder
from samadapt.transforms import model_input
from tests.conftest import make_tiny_sam


def layer_norm_2d_by_hand(x: torch.Tensor, norm: LayerNorm2d) -> torch.Tensor:
    """The formula LayerNorm2d was written as before (SAM's): mean and biased variance over the channel axis."""
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    x = (x - mean) / torch.sqrt(var + norm.eps)
    return norm.weight[:, None, None] * x + norm.bias[:, None, None]


@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_norm_2d_equals_the_channel_formula_with_gradients(channels_last):
    torch.manual_seed(0)
    norm = LayerNorm2d(24)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 24, 9, 7) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    got, expected = norm(x), layer_norm_2d_by_hand(x, norm)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    grad = torch.randn_like(expected)
    got_grads = torch.autograd.grad(got, [x, norm.weight, norm.bias], grad)
    expected_grads = torch.autograd.grad(expected, [x, norm.weight, norm.bias], grad)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(("kernel", "bias"), [(2, True), (2, False), (3, True)])
def test_block_transposed_convolution_as_matmul_equals_the_layer_with_gradients(kernel, bias):
    torch.manual_seed(1)
    layer = nn.ConvTranspose2d(16, 8, kernel_size=kernel, stride=kernel, bias=bias)
    assert _is_block_conv_transpose(layer)
    x = torch.randn(2, 16, 5, 6, requires_grad=True)
    got, expected = _conv_transpose_as_matmul(x, layer), layer(x)
    assert got.shape == expected.shape == (2, 8, 5 * kernel, 6 * kernel)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    params = [x, *layer.parameters()]
    grad = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(expected, params, grad), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    with torch.inference_mode():  # the oneDNN product (accel.kernels.dense) of CPU inference
        torch.testing.assert_close(_conv_transpose_as_matmul(x, layer, kernels.dense), expected, atol=1e-5, rtol=0)


def test_only_block_transposed_convolutions_take_the_matmul_path():
    assert not _is_block_conv_transpose(nn.ConvTranspose2d(4, 4, kernel_size=3, stride=2))
    assert not _is_block_conv_transpose(nn.ConvTranspose2d(4, 4, kernel_size=2, stride=2, padding=1))
    assert not _is_block_conv_transpose(nn.ConvTranspose2d(4, 4, kernel_size=2, stride=2, groups=2))
    assert not _is_block_conv_transpose(nn.Conv2d(4, 4, kernel_size=2, stride=2))


def test_decoder_upscaler_equals_its_layers_applied_in_turn():
    decoder = make_tiny_sam().mask_decoder
    x = torch.randn(1, 256, 16, 16)
    expected = x
    for layer in decoder.output_upscaling:
        expected = layer_norm_2d_by_hand(expected, layer) if isinstance(layer, LayerNorm2d) else layer(expected)
    with torch.inference_mode():
        got = decoder._upscale(x)
        accelerated = accelerate(decoder)._upscale(x)  # oneDNN's products (accel.kernels.dense)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(accelerated, expected, atol=1e-5, rtol=0)


def test_dense_pe_cache_equals_the_computed_encoding_and_follows_size_and_weights():
    encoder = PromptEncoder(32, (8, 8), (128, 128), mask_in_chans=16)
    fresh = encoder.get_dense_pe()  # autograd on: computed, not cached
    with torch.inference_mode():
        first, again = encoder.get_dense_pe(), encoder.get_dense_pe()
        assert again is first
        torch.testing.assert_close(first, fresh, atol=0, rtol=0)
        encoder.image_embedding_size = (4, 6)
        resized = encoder.get_dense_pe()
        assert resized.shape == (1, 32, 4, 6)
    torch.testing.assert_close(resized, encoder.pe_layer((4, 6)).unsqueeze(0), atol=0, rtol=0)
    state = {k: torch.randn_like(v) if "gaussian" in k else v for k, v in encoder.state_dict().items()}
    encoder.load_state_dict(state)  # new Gaussian matrix: the cached encoding is stale
    with torch.inference_mode():
        reloaded = encoder.get_dense_pe()
    torch.testing.assert_close(reloaded, encoder.pe_layer((4, 6)).unsqueeze(0), atol=0, rtol=0)
    assert not torch.equal(reloaded, resized)


@pytest.mark.parametrize("shape", [(100, 120), (320, 320), (37, 53), (512, 400)])
def test_grey_slices_resampled_as_one_plane_equal_three_planes(shape):
    grey = np.random.default_rng(2).random(shape).astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    got, geometry = model_input(grey, 256)
    expected, expected_geometry = model_input(rgb, 256)
    assert got.shape == (1, 3, 256, 256) and got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert geometry == expected_geometry
    got_np, _ = numpy_model_input(grey, 256)
    expected_np, _ = numpy_model_input(rgb, 256)
    np.testing.assert_array_equal(got_np, expected_np)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize(
    ("source", "target"),
    [((256, 256), (320, 320)), ((64, 64), (256, 256)), ((200, 256), (97, 131)), ((320, 320), (256, 256)),
     ((1024, 333), (256, 104))],
)  # fmt: skip
def test_numpy_tap_resize_equals_the_interpolation_matrices(source, target, antialias):
    logits = np.random.default_rng(4).standard_normal((2, 1, *source)).astype(np.float32) * 10
    rows = _linear_weights(source[0], target[0], antialias)
    cols = _linear_weights(source[1], target[1], antialias)
    expected = rows.astype(np.float64) @ logits @ cols.T.astype(np.float64)
    got = resize(logits, target, antialias=antialias)
    assert got.dtype == np.float32 and got.shape == (2, 1, *target)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
