"""The run directory: the typed manifest's round trip, loading a run alone, and its baseline (the same model with
its adapters off, equal to the base checkpoint the manifest names)."""

import json

import numpy as np
import pytest
import torch

from samadapt.accel import accelerate
from samadapt.errors import ConfigError, RunError
from samadapt.models.registry import build_model
from samadapt.peft import LoRAConfig, PeftConfig, apply_peft, save_adapter
from samadapt.runs import (
    MANIFEST_SCHEMA,
    Manifest,
    RunLayout,
    base_model_facts,
    baseline,
    build_base,
    load_base,
    load_run,
)
from samadapt.transforms import model_input


def test_manifest_round_trip_keeps_every_field_and_unknown_entries(tmp_path):
    manifest = Manifest(
        "lite_medsam",
        "ab" * 32,
        PeftConfig(method="lora").to_dict(),
        base_checkpoint="/weights/lite.pth",
        task="semantic",
        classes={1: "liver", 3: "spleen"},
        preprocessing="ct_abdomen",
        axis=2,
        img_size=256,
        precision="bf16",
        prompt={"kind": "point", "objects": "class"},
        recipe="samed",
        step=40,
        val_dice=0.5,
        extra={"text_projection": {"dim": 384}},
    )
    data = json.loads(json.dumps(manifest.to_dict()))
    assert data["schema_version"] == MANIFEST_SCHEMA and data["text_projection"] == {"dim": 384}
    assert Manifest.from_dict(data) == manifest


def test_an_old_manifest_is_read_and_a_newer_one_refused():
    old = {"base_model": "lite_medsam", "base_sha256": "0" * 64, "peft": {}, "classes": {"1": "x"}, "tensors": 3}
    manifest = Manifest.from_dict(old)
    assert manifest.classes == {1: "x"} and manifest.schema_version == MANIFEST_SCHEMA and manifest.extra == {}
    with pytest.raises(RunError, match="schema 99 is newer"):
        Manifest.from_dict({**old, "schema_version": 99}, "run/adapter_config.json")
    with pytest.raises(RunError, match="lacks base_sha256"):
        Manifest.from_dict({"base_model": "lite_medsam", "peft": {}})


@pytest.fixture(scope="module")
def lite_run(tmp_path_factory):
    """A LiteMedSAM LoRA run (encoder + decoder, IoU head trained in full) with moved weights, saved on axis 2."""
    root = tmp_path_factory.mktemp("run")
    model = build_model("lite_medsam")
    config = PeftConfig(
        method="lora", lora=LoRAConfig(decoder=True), train_modules=["mask_decoder.iou_prediction_head"]
    )
    apply_peft(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    manifest = Manifest(
        **base_model_facts("lite_medsam", None), peft=config.to_dict(), classes={1: "lesion"}, axis=2, img_size=256
    )
    save_adapter(model, RunLayout(root).checkpoint("best"), manifest.to_dict())
    return root


def outputs(model, image):
    with torch.no_grad():
        masks, iou = model(model_input(image, 256)[0], boxes=torch.tensor([[60.0, 60, 190, 190]]))
    return masks, iou


@pytest.mark.slow
def test_a_run_loads_alone_and_its_baseline_is_the_base_checkpoint(lite_run):
    run = load_run(lite_run, device="cpu")
    assert run.name == lite_run.name and run.base_model == "lite_medsam" and run.axis == 2
    assert run.label == f"{lite_run.name} (lite_medsam)"
    image = np.random.default_rng(0).random((256, 256), dtype=np.float32)
    base = accelerate(build_model("lite_medsam").eval(), "cpu")  # the form load_run builds
    expected = outputs(base, image)
    adapted = outputs(run.model, image)
    assert not torch.allclose(adapted[0], expected[0], atol=1e-3)
    with baseline(run) as reference:
        assert reference.model is run.model  # no second copy in memory
        for ours, theirs in zip(outputs(reference.model, image), expected, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for ours, theirs in zip(outputs(run.model, image), adapted, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    loaded = load_base(run, device="cpu")
    assert loaded.name == "lite_medsam" and loaded.manifest is None
    for (key, ours), (_, theirs) in zip(loaded.model.state_dict().items(), base.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs), key


def test_a_run_loads_at_its_own_blend_or_at_the_one_asked_for(lite_run, tmp_path):
    """load_run applies the manifest's peft.blend, and an explicit blend overrides it: 0 is the base model."""
    import shutil

    image = np.random.default_rng(0).random((256, 256), dtype=np.float32)
    trained = outputs(load_run(lite_run, device="cpu").model, image)
    as_base = load_run(lite_run, device="cpu", blend=0.0)
    assert as_base.blend == 0.0
    base_outputs = outputs(accelerate(build_model("lite_medsam").eval(), "cpu"), image)
    for ours, theirs in zip(outputs(as_base.model, image), base_outputs, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    halfway_dir = tmp_path / "halfway"
    shutil.copytree(lite_run, halfway_dir)
    adapter = RunLayout(halfway_dir).checkpoint("best")
    manifest = json.loads((adapter / "adapter_config.json").read_text())
    manifest["peft"]["blend"] = 0.5
    (adapter / "adapter_config.json").write_text(json.dumps(manifest))
    halfway = load_run(halfway_dir, device="cpu")
    assert halfway.blend == 0.5 and halfway.label == "halfway (lite_medsam, blend 0.5)"
    assert not torch.allclose(outputs(halfway.model, image)[0], trained[0], atol=1e-4)
    as_trained = load_run(halfway_dir, device="cpu", blend=1.0)
    for ours, theirs in zip(outputs(as_trained.model, image), trained, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert load_run("lite_medsam").blend == 1.0
    with pytest.raises(ConfigError, match="bare model"):
        load_run("lite_medsam", blend=0.5)


def test_the_baseline_refuses_other_base_weights(lite_run):
    run = load_run(lite_run, device="cpu")
    run.manifest.base_sha256 = "f" * 64
    with pytest.raises(RunError, match="trained on base weights ffffffffffff"):
        load_base(run)


@pytest.mark.slow
@pytest.mark.parametrize(("position_prior", "slice_position"), [(True, False), (False, False), (True, True)])
def test_a_semantic_run_loads_with_or_without_the_position_prior_it_was_saved_with(
    tmp_path, position_prior, slice_position
):
    """Semantic runs saved before the decoder's position map existed load without it, newer ones with it, runs
    trained with model.slice_position with their slice prior; all give exactly the outputs of the model that saved
    them."""
    model = build_base("lite_medsam", None, 256, 2, position_prior=position_prior, slice_position=slice_position)
    config = PeftConfig(method="lora")
    apply_peft(model, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    manifest = Manifest(
        **base_model_facts("lite_medsam", None), peft=config.to_dict(), task="semantic", classes={1: "a", 2: "b"}
    )
    save_adapter(model, RunLayout(tmp_path).checkpoint("best"), manifest.to_dict())
    run = load_run(tmp_path, device="cpu")
    assert (run.model.mask_decoder.position_prior is not None) == position_prior
    assert (run.model.mask_decoder.slice_prior is not None) == slice_position
    image = model_input(np.random.default_rng(0).random((256, 256), dtype=np.float32), 256)[0]
    position = torch.tensor([0.3]) if slice_position else None
    with torch.no_grad():
        expected, _ = model.eval()(image, slice_position=position)
        loaded, _ = run.model(image, slice_position=position)
    assert expected.shape == (1, 3, 256, 256)
    torch.testing.assert_close(loaded, expected, rtol=0, atol=0)


def test_a_finished_run_is_used_from_best_when_it_has_one_else_last(tmp_path):
    layout = RunLayout(tmp_path)
    layout.checkpoint("last").mkdir(parents=True)
    assert layout.final_checkpoint() == "last"  # e.g. stopped before its first validation
    layout.checkpoint("best").mkdir()
    assert layout.final_checkpoint() == "best"
    assert layout.lock == tmp_path / ".lock" and layout.checkpoint("best") == tmp_path / "checkpoints" / "best"
