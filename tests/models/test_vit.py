"""Our ViT image encoder against the PyPI segment-anything reference, same random weights."""

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT as ReferenceViT

from samadapt.accel import accelerate
from samadapt.models.checkpoint import load_state_dict_strict
from samadapt.models.vit import ImageEncoderViT


def small_vit_pair(img_size: int, seed: int = 0):
    """A 4-block ViT (2 windowed, 2 global) in both implementations, same random weights."""
    torch.manual_seed(seed)
    kwargs = dict(img_size=img_size, embed_dim=96, depth=4, num_heads=4, global_attn_indexes=(1, 3))
    reference = ReferenceViT(**kwargs, use_rel_pos=True, window_size=14, out_chans=32).eval()
    with torch.no_grad():  # rel-pos tables are zero at init: make them matter
        for name, param in reference.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                param.normal_(0, 0.5)
    ours = ImageEncoderViT(**kwargs, window_size=14, out_chans=32).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("img_size", [1024, 512, 224])
def test_encoder_matches_reference(img_size):
    ours, reference = small_vit_pair(img_size)
    image = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(ours(image), reference(image)) < 1e-5
        assert relative_error(accelerate(ours)(image), reference(image)) < 1e-5  # as Predictor runs it


def test_vit_b_block_matches_reference_at_full_width():
    """One full-width ViT-B global block at the 1024 grid (64 x 64 tokens), where attention cost dominates."""
    from segment_anything.modeling.image_encoder import Block as ReferenceBlock

    from samadapt.models.vit import Block

    torch.manual_seed(0)
    reference = ReferenceBlock(768, 12, use_rel_pos=True, window_size=0, input_size=(64, 64)).eval()
    with torch.no_grad():
        reference.attn.rel_pos_h.normal_(0, 0.5)
        reference.attn.rel_pos_w.normal_(0, 0.5)
    ours = Block(768, 12, 4.0, window_size=0, input_size=(64, 64)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    tokens = torch.randn(1, 64, 64, 768)
    with torch.no_grad():
        assert relative_error(ours(tokens), reference(tokens)) < 1e-5


def test_gradients_match_reference():
    ours, reference = small_vit_pair(256)
    image = torch.randn(2, 3, 256, 256)
    weights = torch.randn(2, 32, 16, 16)  # a loss whose gradient reaches every output element
    (ours(image) * weights).sum().backward()
    (reference(image) * weights).sum().backward()
    for (name, p_ours), (_, p_ref) in zip(ours.named_parameters(), reference.named_parameters(), strict=True):
        assert relative_error(p_ours.grad, p_ref.grad) < 1e-4, name


def test_gradient_checkpointing_gives_same_gradients():
    ours, _ = small_vit_pair(256)
    image = torch.randn(1, 3, 256, 256)
    ours(image).sum().backward()
    plain = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    ours.set_grad_checkpointing(True)
    ours(image).sum().backward()
    for before, p in zip(plain, ours.parameters(), strict=True):
        torch.testing.assert_close(p.grad, before, rtol=1e-5, atol=1e-6)


def test_position_tables_resized_on_load_match_reference_interpolation():
    """A 1024 checkpoint loaded at 512: pos-embed and the global blocks' rel-pos tables are resized, and reported."""
    big, _ = small_vit_pair(1024)
    small = ImageEncoderViT(img_size=512, embed_dim=96, depth=4, num_heads=4, global_attn_indexes=(1, 3), out_chans=32)
    resized = load_state_dict_strict(small, big.state_dict())
    assert set(resized) == {
        "pos_embed",
        "blocks.1.attn.rel_pos_h",
        "blocks.1.attn.rel_pos_w",
        "blocks.3.attn.rel_pos_h",
        "blocks.3.attn.rel_pos_w",
    }
    assert small.pos_embed.shape == (1, 32, 32, 96)
    assert small.blocks[1].attn.rel_pos_h.shape == (63, 24)
    # windowed blocks keep their 14 x 14 window tables untouched
    torch.testing.assert_close(small.blocks[0].attn.rel_pos_h, big.blocks[0].attn.rel_pos_h)


def test_slots_are_on_the_path():
    ours, _ = small_vit_pair(224)
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        before = ours(image)

        class AddOne(torch.nn.Module):
            def forward(self, x, *context):
                return x + 1.0

        for slot in ("attn_adapter", "mlp_adapter", "depth_branch"):
            block = ours.blocks[0]
            original = getattr(block, slot)
            setattr(block, slot, AddOne())
            assert not torch.allclose(ours(image), before), slot
            setattr(block, slot, original)
        torch.testing.assert_close(ours(image), before, rtol=0, atol=0)


def test_training_and_inference_attention_paths_agree():
    """The fused path used when gradients are needed and the bias-mask path used in inference compute one function."""
    ours, reference = small_vit_pair(448)
    image = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        expected = reference(image)
        inference = ours(image)
    training = ours(image)  # parameters require grad: the folded-bias path
    assert training.requires_grad
    assert relative_error(inference, expected) < 1e-5
    assert relative_error(training.detach(), expected) < 1e-5


@pytest.mark.parametrize("rows", [1, 3, 7])
def test_inference_bias_in_chunks_of_query_rows_is_the_whole_bias(rows, monkeypatch):
    """Chunks of 1, 3 (a shorter last one) and 7 grid rows of a 7 x 5 grid: every query sees the same bias and
    attention as with the whole (B, heads, N, N) bias built at once."""
    from samadapt.models import vit

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 35, 8, generator=g) for _ in range(3))
    rel_h, rel_w = torch.randn(13, 8, generator=g), torch.randn(9, 8, generator=g)
    whole = vit.relative_position_bias(q, rel_h, rel_w, (7, 5))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=whole)
    monkeypatch.setattr(vit, "BIAS_CHUNK_BYTES", rows * 2 * 3 * 5 * 35 * 4)  # rows x (B, heads, W, N) float32
    adds = []
    add = torch.add
    monkeypatch.setattr(vit.torch, "add", lambda *a, **kw: adds.append(1) or add(*a, **kw))
    with torch.no_grad():
        got = vit.attention_with_rel_pos(q, k, v, rel_h, rel_w, (7, 5))
    assert len(adds) == -(-7 // rows)  # one bias chunk per call of the fused kernel
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
