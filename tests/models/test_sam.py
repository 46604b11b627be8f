"""Our assembled SAM against segment-anything's, same random weights: embeddings, masks, IoU for every prompt kind."""

import numpy as np
import pytest
import torch
from segment_anything.modeling import MaskDecoder as RefMaskDecoder
from segment_anything.modeling import PromptEncoder as RefPromptEncoder
from segment_anything.modeling import TwoWayTransformer as RefTransformer

from samadapt.accel import accelerate
from samadapt.models.checkpoint import load_state_dict_strict
from samadapt.models.mask_decoder import make_semantic_decoder
from samadapt.models.registry import build_model
from samadapt.transforms import InputGeometry
from tests.models.test_vit import relative_error


def reference_decoder_pair(seed=0, embed=64):
    """segment-anything's prompt encoder + decoder and ours, same random weights (full-width SAM decoder)."""
    torch.manual_seed(seed)
    ref_prompt = RefPromptEncoder(
        embed_dim=256, image_embedding_size=(embed, embed), input_image_size=(embed * 16, embed * 16), mask_in_chans=16
    )
    ref_decoder = RefMaskDecoder(
        num_multimask_outputs=3,
        transformer=RefTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
    )
    with torch.no_grad():
        for p in list(ref_prompt.parameters()) + list(ref_decoder.parameters()):
            p.add_(torch.randn_like(p) * 0.02)  # embeddings and norms start at constants: make them distinct
    ours = build_model("sam_vit_b", pretrained=False, img_size=embed * 16)
    load_state_dict_strict(ours.prompt_encoder, ref_prompt.state_dict())
    load_state_dict_strict(ours.mask_decoder, ref_decoder.state_dict())
    return accelerate(ours), ref_prompt, ref_decoder  # as Predictor runs it


PROMPTS = {
    "points": lambda g: dict(
        points=(torch.rand(2, 3, 2, generator=g) * 1024, torch.tensor([[1, 0, 1], [1, 1, 0]])), boxes=None, masks=None
    ),
    "box": lambda g: dict(
        points=None, boxes=torch.tensor([[100.0, 200.0, 600.0, 700.0], [10.0, 20.0, 300.0, 900.0]]), masks=None
    ),
    "points+box": lambda g: dict(
        points=(torch.rand(2, 1, 2, generator=g) * 1024, torch.tensor([[1], [0]])),
        boxes=torch.tensor([[100.0, 200.0, 600.0, 700.0]] * 2),
        masks=None,
    ),
    "mask": lambda g: dict(points=None, boxes=None, masks=torch.randn(2, 1, 256, 256, generator=g)),
    "points+mask": lambda g: dict(
        points=(torch.rand(2, 2, 2, generator=g) * 1024, torch.tensor([[1, 0], [1, 1]])),
        boxes=None,
        masks=torch.randn(2, 1, 256, 256, generator=g),
    ),
}


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
@pytest.mark.parametrize("multimask", [False, True])
def test_prompt_encoder_and_decoder_match_reference(prompt, multimask):
    ours, ref_prompt, ref_decoder = reference_decoder_pair()
    g = torch.Generator().manual_seed(3)
    kwargs = PROMPTS[prompt](g)
    embedding = torch.randn(1, 256, 64, 64, generator=g)
    with torch.no_grad():
        sparse, dense = ours.prompt_encoder(**kwargs)
        ref_sparse, ref_dense = ref_prompt(**kwargs)
        torch.testing.assert_close(sparse, ref_sparse, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dense, ref_dense)
        masks, iou = ours.mask_decoder(embedding, ours.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
        ref_masks, ref_iou = ref_decoder(embedding, ref_prompt.get_dense_pe(), ref_sparse, ref_dense, multimask)
    assert masks.shape == ref_masks.shape == (2, 3 if multimask else 1, 256, 256)
    assert relative_error(masks, ref_masks) < 1e-4
    assert relative_error(iou, ref_iou) < 1e-4


def reference_sam_pair(img_size: int):
    """Full SAM ViT-B: segment-anything's and ours with the same random weights."""
    from bench.reference import reference_sam_vit_b

    torch.manual_seed(0)
    reference = reference_sam_vit_b(img_size).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "rel_pos" in name or "pos_embed" in name or "point_embeddings" in name:
                p.normal_(0, 0.2)
    ours = build_model("sam_vit_b", pretrained=False, img_size=img_size)
    load_state_dict_strict(ours, reference.state_dict())
    return accelerate(ours), reference


@pytest.mark.slow
@pytest.mark.parametrize("img_size", [1024, 512])
def test_full_vit_b_sam_matches_reference(img_size):
    """Same image through both (our resize on both sides), point / box / mask prompts: embeddings, masks, IoU."""
    ours, reference = reference_sam_pair(img_size)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(300, 400, 3)).astype(np.float32)
    geometry = InputGeometry((300, 400), img_size)
    tensor = geometry.image_to_input(torch.from_numpy(image).permute(2, 0, 1)[None] / 255.0)
    with torch.no_grad():
        embedding = ours.encode_image(tensor)
        ref_embedding = reference.image_encoder(reference.preprocess(tensor * 255.0))
        assert relative_error(embedding, ref_embedding) < 1e-4
        points = (
            torch.as_tensor(geometry.coords_to_input(np.array([[[120.0, 80.0], [300.0, 200.0]]]))),
            torch.tensor([[1, 0]]),
        )
        box = torch.as_tensor(geometry.boxes_to_input(np.array([[50.0, 40.0, 250.0, 220.0]])))
        low_res = torch.randn(1, 1, img_size // 4, img_size // 4, generator=torch.Generator().manual_seed(0))
        for kwargs in [dict(points=points), dict(boxes=box), dict(points=points, boxes=box, mask_inputs=low_res)]:
            masks, iou = ours.decode(embedding, **kwargs, multimask_output=True)
            ref_sparse, ref_dense = reference.prompt_encoder(
                kwargs.get("points"), kwargs.get("boxes"), kwargs.get("mask_inputs")
            )
            ref_masks, ref_iou = reference.mask_decoder(
                ref_embedding, reference.prompt_encoder.get_dense_pe(), ref_sparse, ref_dense, True
            )
            assert relative_error(masks, ref_masks) < 1e-4
            assert relative_error(iou, ref_iou) < 1e-4


def test_batched_images_and_prompts_decode_like_one_at_a_time():
    ours, _, _ = reference_decoder_pair(embed=16)
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(3, 256, 16, 16, generator=g)
    boxes = torch.tensor([[10.0, 10.0, 100.0, 120.0], [50.0, 60.0, 200.0, 250.0], [0.0, 0.0, 255.0, 255.0]])
    with torch.no_grad():
        batched, _ = ours.decode(embeddings, boxes=boxes)
        single = torch.cat([ours.decode(embeddings[i : i + 1], boxes=boxes[i : i + 1])[0] for i in range(3)])
        shared, _ = ours.decode(embeddings[:1], boxes=boxes)  # one image, three boxes
        shared_single = torch.cat([ours.decode(embeddings[:1], boxes=boxes[i : i + 1])[0] for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared, shared_single, rtol=1e-5, atol=1e-5)


def test_semantic_decoder_outputs_all_classes_and_starts_from_the_pretrained_heads():
    ours, _, _ = reference_decoder_pair(embed=16)
    embeddings = torch.randn(2, 256, 16, 16)
    with torch.no_grad():
        prompted_all, _ = ours.mask_decoder.predict_masks(
            embeddings, ours.prompt_encoder.get_dense_pe(), *_no_prompt(ours, 2)
        )
        changed = make_semantic_decoder(ours.mask_decoder, num_classes=5)
        logits, iou = ours.decode(embeddings)
    assert logits.shape == (2, 6, 64, 64) and iou.shape == (2, 6)
    assert "mask_tokens.weight" in changed and any(k.startswith("output_hypernetworks_mlps.5") for k in changed)
    # class token 4 starts as pre-trained multimask token 1 (the transformer sees more tokens, so compare loosely);
    # the background channel starts at 0 (its head's last layer zeroed)
    assert torch.corrcoef(torch.stack([logits[:, 4].flatten(), prompted_all[:, 1].flatten()]))[0, 1] > 0.9
    assert torch.count_nonzero(logits[:, 0]) == 0


def _no_prompt(model, batch):
    sparse, dense = model.prompt_encoder(None, None, None)
    return sparse.expand(batch, -1, -1), dense.expand(batch, -1, -1, -1)
