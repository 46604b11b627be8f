"""PEFT methods on small SAM models: exactness at init, what trains, counts, merge, save/load, depth branch."""

import copy

import pytest
import torch

from samadapt.models.vit import ImageEncoderViT
from samadapt.peft import (
    AdapterConfig,
    LoRAConfig,
    LoRALinear,
    PeftConfig,
    apply_peft,
    load_adapter_weights,
    merge_lora,
    parameter_report,
    save_adapter,
    set_depth,
    unmerge_lora,
)
from samadapt.peft.inject import is_peft_key
from tests.conftest import make_tiny_sam

METHODS = ["msa", "lora", "msa+lora"]


def run(model, images, points=None, boxes=None):
    return model(images, points=points, boxes=boxes)


def inputs(batch=2, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g)
    coords = torch.rand(batch, 2, 2, generator=g) * size
    labels = torch.tensor([[1, 0]] * batch)
    return images, (coords, labels)


def randomise_peft_weights(model, seed=1):
    """Give every PEFT tensor non-zero values, so adapted outputs differ from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_peft_key(name):
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)


@pytest.mark.parametrize("method", METHODS)
def test_zero_initialised_peft_gives_the_base_outputs_exactly(method):
    base = make_tiny_sam()
    adapted = apply_peft(copy.deepcopy(base), PeftConfig(method=method, lora=LoRAConfig(decoder=True)))
    images, points = inputs()
    with torch.no_grad():
        for a, b in zip(run(adapted, images, points), run(base, images, points), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_one_step_changes_only_what_the_policy_trains(method):
    model = apply_peft(make_tiny_sam(), PeftConfig(method=method))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images, points = inputs()
    # two steps: the first moves B (LoRA) / up-projections off zero, the second reaches A / down-projections too
    for _ in range(2):
        logits, iou = run(model, images, points)
        (logits.sigmoid().mean() + iou.mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen_changed = changed - trainable
    assert not frozen_changed, f"frozen tensors changed: {sorted(frozen_changed)[:5]}"
    assert changed, "nothing trained"
    peft_trainable = {n for n in trainable if is_peft_key(n)}
    assert peft_trainable and peft_trainable <= changed
    if method == "lora":
        assert all(n.startswith(("prompt_encoder", "mask_decoder")) or is_peft_key(n) for n in trainable)
        assert not any(n.startswith("image_encoder") and not is_peft_key(n) for n in trainable)


def test_lora_parameter_count_on_vit_b_matches_hand_computation():
    encoder = ImageEncoderViT(img_size=256, embed_dim=768, depth=12, num_heads=12)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image_encoder = encoder

    from samadapt.peft.lora import inject_lora

    inject_lora(Holder(), LoRAConfig(rank=4))
    lora = sum(p.numel() for n, p in encoder.named_parameters() if "lora_" in n)
    # per block: q and v each get A (4 x 768) and B (768 x 4) -> 2 * 2 * 4 * 768; 12 blocks
    assert lora == 12 * 2 * 2 * 4 * 768 == 147_456


def test_adapter_parameter_count_matches_hand_computation():
    model = apply_peft(make_tiny_sam(), PeftConfig(method="msa", adapter=AdapterConfig(ratio=0.25)))
    dim, hidden = 64, 16
    per_adapter = dim * hidden + hidden + hidden * dim + dim
    encoder = sum(p.numel() for n, p in model.image_encoder.named_parameters() if is_peft_key(n))
    assert encoder == 4 * 2 * per_adapter
    d_dim, d_hidden = 256, 64
    d_adapter = d_dim * d_hidden + d_hidden + d_hidden * d_dim + d_dim
    decoder = sum(p.numel() for n, p in model.mask_decoder.named_parameters() if is_peft_key(n))
    assert decoder == 3 * d_adapter + d_dim * d_hidden + d_hidden  # + the prompt down-projection
    report = {row["module"]: row for row in parameter_report(model)}
    assert report["total"]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_targets_only_q_and_v_rows():
    model = apply_peft(make_tiny_sam(), PeftConfig(method="lora"))
    randomise_peft_weights(model)
    qkv = model.image_encoder.blocks[0].attn.qkv
    assert isinstance(qkv, LoRALinear)
    delta = qkv.delta_weight()
    dim = 64
    assert delta[:dim].abs().sum() > 0  # q
    assert delta[dim : 2 * dim].abs().sum() == 0  # k untouched
    assert delta[2 * dim :].abs().sum() > 0  # v


def test_merged_lora_equals_unmerged():
    model = apply_peft(make_tiny_sam(), PeftConfig(method="lora", lora=LoRAConfig(decoder=True, alpha=8)))
    randomise_peft_weights(model)
    images, points = inputs()
    with torch.no_grad():
        plain = run(model, images, points)
        merge_lora(model)
        merged = run(model, images, points)
        unmerge_lora(model)
        again = run(model, images, points)
    for a, b in zip(plain, merged, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(plain, again, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_and_mismatched_base_is_refused(method, tmp_path):
    config = PeftConfig(method=method)
    model = apply_peft(make_tiny_sam(), config)
    randomise_peft_weights(model)
    manifest = {"base_model": "tiny", "base_sha256": "a" * 64, "peft": config.to_dict(), "img_size": 128}
    save_adapter(model, tmp_path, manifest)
    fresh = apply_peft(make_tiny_sam(), PeftConfig(**config.to_dict()))
    loaded_manifest = load_adapter_weights(fresh, tmp_path, base_sha256="a" * 64)
    assert loaded_manifest["img_size"] == 128
    images, points = inputs()
    with torch.no_grad():
        for a, b in zip(run(model, images, points), run(fresh, images, points), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="base weights"):
        load_adapter_weights(fresh, tmp_path, base_sha256="b" * 64)


def test_plain_checkpoint_keys_unchanged_by_peft():
    base_keys = set(make_tiny_sam().state_dict())
    adapted = apply_peft(make_tiny_sam(), PeftConfig(method="msa+lora", depth=True))
    adapted_keys = set(adapted.state_dict())
    assert base_keys <= adapted_keys
    assert all(is_peft_key(k) for k in adapted_keys - base_keys)


def test_adapter_file_is_small_for_vit_b_lora(tmp_path):
    from samadapt.models.registry import build_model

    model = build_model("sam_vit_b", pretrained=False, img_size=256)
    config = PeftConfig(method="lora", train_modules=[])
    apply_peft(model, config)
    save_adapter(model, tmp_path, {"base_model": "sam_vit_b", "base_sha256": "0" * 64, "peft": config.to_dict()})
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert 147_456 * 4 <= size < 1_000_000  # LoRA only: ~0.6 MB, against ~360 MB for SAM ViT-B


def test_decoder_adapter_is_conditioned_on_the_prompt():
    model = apply_peft(make_tiny_sam(), PeftConfig(method="msa"))
    randomise_peft_weights(model)
    adapter = model.mask_decoder.transformer.layers[0].token_to_image_adapter
    tokens = torch.randn(1, 3, 256)
    prompt_a, prompt_b = torch.randn(1, 3, 256), torch.randn(1, 3, 256)
    with torch.no_grad():
        assert not torch.allclose(adapter(tokens, prompt_a), adapter(tokens, prompt_b))
        # and inside the model: moving only the click changes what the adapter sees and returns
        seen = []
        hook = adapter.register_forward_hook(lambda m, args, out: seen.append((args[1].clone(), out.clone())))
        images, (coords, labels) = inputs(batch=1)
        run(model, images, (coords, labels))
        run(model, images, (coords + 10, labels))
        hook.remove()
    assert not torch.allclose(seen[0][0], seen[1][0])
    assert not torch.allclose(seen[0][1], seen[1][1])


def test_depth_branch_mixes_slices_and_single_slice_equals_2d():
    base = make_tiny_sam()
    model = apply_peft(copy.deepcopy(base), PeftConfig(method="msa", depth=True))
    randomise_peft_weights(model)
    stack = torch.rand(4, 3, 128, 128)
    with torch.no_grad():
        out = model.encode_image(stack)
        changed = stack.clone()
        changed[3] += 0.5
        out_changed = model.encode_image(changed)
        assert not torch.allclose(out[0], out_changed[0], atol=1e-6), "slice 3 must influence slice 0"
        # D = 1: nothing to mix, the depth branch adds nothing
        single = model.encode_image(stack[:1])
        set_depth(model, 1)
        as_2d = model.encode_image(stack[:1])
        torch.testing.assert_close(single, as_2d, rtol=0, atol=0)
        # two volumes of two slices in one batch: volumes do not mix
        set_depth(model, 2)
        pair = model.encode_image(stack)
        pair_changed = model.encode_image(changed)
        torch.testing.assert_close(pair[:2], pair_changed[:2], rtol=0, atol=0)
        assert not torch.allclose(pair[2], pair_changed[2])


def test_depth_branch_without_other_peft_equals_2d_path_with_adapters_zero():
    """At initialisation the depth branch's output adapter is zero: a 3D model starts as the 2D model."""
    base = make_tiny_sam()
    model = apply_peft(copy.deepcopy(base), PeftConfig(method="msa", depth=True))
    stack = torch.rand(3, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(stack), base.encode_image(stack), rtol=0, atol=0)


def test_an_adapter_file_missing_a_trained_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from samadapt.peft.inject import ADAPTER_WEIGHTS

    config = PeftConfig(method="lora")
    model = apply_peft(make_tiny_sam(), config)
    save_adapter(model, tmp_path, {"base_model": "tiny", "base_sha256": "a" * 64, "peft": config.to_dict()})
    tensors = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(tmp_path / ADAPTER_WEIGHTS))
    fresh = apply_peft(make_tiny_sam(), PeftConfig(**config.to_dict()))
    with pytest.raises(ValueError, match=rf"1 trained tensors .*missing \({dropped}\)"):
        load_adapter_weights(fresh, tmp_path, base_sha256="a" * 64)


def randomise_trainable_weights(model, seed=2):
    """Move every trainable tensor (PEFT and fully trained modules) off its base value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)


@pytest.mark.parametrize(
    "config",
    [
        PeftConfig(method="msa"),
        PeftConfig(method="lora", lora=LoRAConfig(decoder=True)),  # SAMed-like: prompt encoder + decoder in full
        PeftConfig(method="msa+lora", depth=True),
    ],
    ids=["msa", "lora", "msa+lora-depth"],
)
@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapters_gives_the_base_model_and_restores_the_adapted_one(config, merged):
    from samadapt.peft import disable_adapters

    base = make_tiny_sam()
    adapted = apply_peft(copy.deepcopy(base), config)
    randomise_trainable_weights(adapted)
    if merged:
        merge_lora(adapted)
    images, points = inputs()
    with torch.no_grad():
        expected_base = run(base, images, points)
        expected_adapted = run(adapted, images, points)
        assert not torch.allclose(expected_adapted[0], expected_base[0], atol=1e-3)
        with disable_adapters(adapted):
            for a, b in zip(run(adapted, images, points), expected_base, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6 if merged else 0)
        for a, b in zip(run(adapted, images, points), expected_adapted, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6 if merged else 0)
    assert all(m.merged == merged for m in adapted.modules() if isinstance(m, LoRALinear))


def test_disable_adapters_restores_the_adapted_model_after_an_error():
    from samadapt.peft import disable_adapters

    adapted = apply_peft(make_tiny_sam(), PeftConfig(method="lora"))
    randomise_trainable_weights(adapted)
    images, points = inputs()
    with torch.no_grad():
        expected = run(adapted, images, points)
        with pytest.raises(RuntimeError, match="inside the block"), disable_adapters(adapted):
            raise RuntimeError("inside the block")
        torch.testing.assert_close(run(adapted, images, points)[0], expected[0], rtol=0, atol=0)


def test_a_semantic_decoder_cannot_be_switched_back():
    from samadapt.errors import RunError
    from samadapt.models.mask_decoder import make_semantic_decoder
    from samadapt.peft import disable_adapters

    model = make_tiny_sam()
    make_semantic_decoder(model.mask_decoder, 3)
    apply_peft(model, PeftConfig(method="lora"))
    with pytest.raises(RunError, match="semantic"), disable_adapters(model):
        pass


def test_lora_linear_is_the_written_out_formula_with_its_gradients():
    """y = W x + b + (alpha / r) B_q A_q x on the q rows and B_v A_v x on the v rows (the addmm path)."""
    from samadapt.peft.lora import LoRALinear

    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(16, 12)
    parts = {"q": [slice(0, 2), slice(6, 8)], "v": [slice(4, 6), slice(10, 12)]}
    layer = LoRALinear(base, parts, rank=3, alpha=6.0)
    with torch.no_grad():
        for name in ("lora_B_q", "lora_B_v"):
            getattr(layer, name).normal_(generator=g)
    x = torch.randn(2, 5, 16, generator=g)
    rows = {"q": [0, 1, 6, 7], "v": [4, 5, 10, 11]}
    factors = [layer.lora_A_q, layer.lora_B_q, layer.lora_A_v, layer.lora_B_v]

    def written_out() -> torch.Tensor:
        out = x @ base.weight.T + base.bias
        for name, index in rows.items():
            a, b = getattr(layer, f"lora_A_{name}"), getattr(layer, f"lora_B_{name}")
            update = torch.zeros_like(out)
            update[..., index] = 2.0 * (x @ a.T @ b.T)
            out = out + update
        return out

    upstream = torch.randn(2, 5, 12, generator=g)
    expected = written_out()
    expected_grads = torch.autograd.grad((expected * upstream).sum(), factors)
    got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad((got * upstream).sum(), factors), expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_register_method_refuses_a_taken_name():
    from samadapt.errors import ConfigError
    from samadapt.peft.registry import METHODS, register_method

    with pytest.raises(ConfigError, match="'lora' is already registered"):
        register_method("lora", ("adapters",))
    assert METHODS["lora"] == ("lora",)  # the original is untouched
    register_method("lora-then-adapters", ("lora", "adapters"))
    try:
        assert METHODS["lora-then-adapters"] == ("lora", "adapters")
        with pytest.raises(ConfigError, match="already registered"):
            register_method("lora-then-adapters", ("lora", "adapters"))  # even with the same parts
    finally:
        del METHODS["lora-then-adapters"]
    with pytest.raises(ConfigError, match="unknown parts"):
        register_method("new", ("prefix",))
    assert "new" not in METHODS
