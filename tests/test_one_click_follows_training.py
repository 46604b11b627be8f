"""How one click alone is answered (issue 30), one rule (``selection.one_click_best``) in the Predictor, evaluate, the
predict CLI and the ONNX runtime: by default SAM's best of three candidates; under the ``trained`` rule (an option,
``--one-click trained``) the best of three for the un-adapted model and for a run trained with multimask outputs,
the single-mask output (token 0) for a run that trained only that one, read off the manifest (schema 2; older
manifests upgraded)."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from samadapt.errors import ConfigError
from samadapt.eval.evaluate import evaluate_slices
from samadapt.eval.metrics import dice
from samadapt.models.registry import build_model
from samadapt.peft import LoRAConfig, PeftConfig, apply_peft, save_adapter
from samadapt.predict import Predictor
from samadapt.runs import MANIFEST_SCHEMA, Manifest, RunLayout, base_model_facts, baseline, load_run, trained_outputs
from samadapt.selection import best_candidate, one_click_best

CHEAP_LUNCH = PeftConfig(
    method="lora", lora=LoRAConfig(decoder=True), train_modules=["mask_decoder.iou_prediction_head"]
)


def test_the_rules_and_what_a_manifest_says_it_trained():
    single, multimask = {"outputs": {"masks": "single", "iou_head": True}}, {"outputs": {"masks": "multimask"}}
    for manifest in (None, {}, single, multimask):  # the default: the best of three for every model
        assert one_click_best(manifest) and one_click_best(manifest, "best")
        assert not one_click_best(manifest, "single")
    assert one_click_best(None, "trained") and one_click_best({}, "trained")  # an un-adapted model
    assert one_click_best(multimask, "trained") and not one_click_best(single, "trained")
    # a manifest without ``outputs`` (before schema 2): what its training did, by default the single mask
    assert not one_click_best({"task": "prompt", "prompt": {"kind": "point"}}, "trained")
    assert one_click_best({"task": "prompt", "prompt": {"kind": "point", "multimask": True}}, "trained")
    with pytest.raises(ConfigError, match="one-click rule 'largest'"):
        one_click_best(single, "largest")
    peft = CHEAP_LUNCH.to_dict()
    assert trained_outputs("prompt", {"multimask": True}, peft) == {"masks": "multimask", "iou_head": True}
    assert trained_outputs("prompt", {}, peft, iou_loss=0.0) == {"masks": "single", "iou_head": False}
    assert trained_outputs("prompt", {}, PeftConfig(method="lora", train_modules=[]).to_dict())["iou_head"] is False
    assert trained_outputs("prompt", {}, PeftConfig(method="msa").to_dict())["iou_head"] is True  # msa's defaults
    assert trained_outputs("semantic", {}, PeftConfig(method="lora").to_dict()) == {
        "masks": "semantic",
        "iou_head": False,
    }


def test_old_manifests_upgrade_from_their_run_config_else_to_the_single_mask():
    old = {
        "base_model": "lite_medsam",
        "base_sha256": "0" * 64,
        "peft": CHEAP_LUNCH.to_dict(),
        "prompt": {"kind": "point", "objects": "class"},
        "schema_version": 1,
    }
    manifest = Manifest.from_dict(old)
    assert manifest.schema_version == MANIFEST_SCHEMA == 2
    assert manifest.outputs == {"masks": "single", "iou_head": True} and manifest.prompt["multimask"] is False
    config = {"prompt": {"multimask": True}, "loss": {"iou": 0.0}}
    upgraded = Manifest.from_dict(old, run_config=config)
    assert upgraded.outputs == {"masks": "multimask", "iou_head": False} and upgraded.prompt["multimask"] is True
    # schema 2 says it itself: a run config does not override it
    current = json.loads(json.dumps(upgraded.to_dict()))
    assert Manifest.from_dict(current, run_config={"prompt": {"multimask": False}}) == upgraded
    semantic = Manifest.from_dict({**old, "task": "semantic", "classes": {"1": "liver"}})
    assert semantic.outputs["masks"] == "semantic"


def ring_image(size: int = 256) -> np.ndarray:
    """A bright ring around a dim core on noise: one click in the core is ambiguous (core, ring, or both)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - 120, xx - 130)
    image = 0.15 * rng.random((size, size)) + 0.35 * (radius < 30) + 0.8 * ((radius >= 30) & (radius < 55))
    return (image / image.max()).astype(np.float32)


CLICKS = [(130, 120), (150, 120), (100, 95), (130, 160)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One LiteMedSAM Cheap-Lunch-like adapter (random update) saved as: a run that trained the single-mask output,
    one that trained multimask, an old (schema 1) run whose config.yaml says multimask, and an old one without it."""
    root = tmp_path_factory.mktemp("runs")
    model = build_model("lite_medsam")
    apply_peft(model, CHEAP_LUNCH)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    facts = base_model_facts("lite_medsam", None)
    paths = {}
    for name, prompt in (("single", {"kind": "point"}), ("multimask", {"kind": "point", "multimask": True})):
        manifest = Manifest(**facts, peft=CHEAP_LUNCH.to_dict(), classes={1: "ring"}, prompt=prompt)
        save_adapter(model, RunLayout(root / name).checkpoint("best"), manifest.to_dict())
        paths[name] = root / name
    for name, multimask in (("old-multimask", True), ("old-default", None)):
        shutil.copytree(paths["single"], root / name)
        manifest_path = RunLayout(root / name).checkpoint("best") / "adapter_config.json"
        data = json.loads(manifest_path.read_text())
        data.pop("outputs")
        data["prompt"] = {"kind": "point", "objects": "class"}  # what schema 1 recorded
        data["schema_version"] = 1
        manifest_path.write_text(json.dumps(data))
        if multimask is not None:
            RunLayout(root / name).config.write_text(yaml.safe_dump({"prompt": {"multimask": multimask}}))
        paths[name] = root / name
    return paths


def test_load_run_sets_the_selection_from_the_manifest_under_the_trained_rule(runs):
    from samadapt.inference import load_predictor

    expected = {"single": False, "multimask": True, "old-multimask": True, "old-default": False}
    for name, selects in expected.items():
        default = load_run(runs[name], device="cpu")
        assert default.select_single_click is True and Predictor.for_run(default, "cpu").select_single_click is True
        run = dataclasses.replace(default, one_click="trained")
        assert run.select_single_click is selects, name
        assert Predictor.for_run(run, "cpu").select_single_click is selects, name
        assert load_predictor(runs[name], device="cpu", one_click="trained").select_single_click is selects, name
        with baseline(run) as base:  # the un-adapted model: SAM's best of three
            assert base.select_single_click is True
    assert load_run("lite_medsam", device="cpu").select_single_click is True


@pytest.mark.slow
def test_the_predictor_answers_one_click_as_the_run_trained_under_the_trained_rule(runs):
    single, multimask = (
        dataclasses.replace(load_run(runs[n], device="cpu"), one_click="trained") for n in ("single", "multimask")
    )
    image = ring_image()
    differed = 0
    for run, want_best in ((single, False), (multimask, True)):
        predictor = Predictor.for_run(run, "cpu")
        predictor.set_image(image, preprocessed=True)
        for x, y in CLICKS:
            prompt = dict(points=np.array([[x, y]]), labels=np.array([1]))
            answer = predictor.predict(**prompt)
            token0 = predictor.predict(**prompt, multimask_output=False)
            three = predictor.predict(**prompt, multimask_output=True)
            best = int(np.argmax(three.scores[0]))
            expected = three.masks[0, best] if want_best else token0.masks[0, 0]
            assert np.array_equal(answer.masks[0, 0], expected)
            differed += not np.array_equal(token0.masks[0, 0], three.masks[0, best])
        with baseline(run) as base:
            base_predictor = Predictor.for_run(base, "cpu")
            base_predictor.set_image(image, preprocessed=True)
            prompt = dict(points=np.array([list(CLICKS[0])]), labels=np.array([1]))
            three = base_predictor.predict(**prompt, multimask_output=True)
            logits, _ = best_candidate(three.low_res_logits, torch.as_tensor(three.scores))
            assert torch.equal(base_predictor.predict(**prompt).low_res_logits, logits)
    assert differed  # on these clicks token 0 and the best candidate differ: the test tells the two rules apart


@pytest.mark.slow
def test_evaluate_and_the_predict_cli_answer_one_click_with_token_0_under_the_trained_rule(runs, tmp_path):
    from samadapt.cli import main
    from samadapt.data.io import read_volume
    from samadapt.data.preprocess import preprocess_volume, volume_slice
    from samadapt.prompts import centre_click
    from tests.data.conftest import write_nifti

    run = dataclasses.replace(load_run(runs["single"], device="cpu"), one_click="trained")
    image = ring_image()
    label = (np.hypot(*np.mgrid[-120:136, -130:126]) < 55).astype(np.int64)
    item = {"image": image, "label": label, "case": "ring", "slice": 0, "spacing": (1.0, 1.0)}
    token0 = Predictor(run.model, device="cpu", select_single_click=False)
    token0.set_image(image, preprocessed=True)
    click = centre_click(label == 1)
    expected = token0.predict(points=np.array([[click.x, click.y]]), labels=np.array([1])).masks[0, 0]
    evaluation = evaluate_slices(run, [item], {1: "ring"}, "point:1", progress=False)
    assert evaluation.rows[0]["dice"] == pytest.approx(dice(expected, label == 1), abs=1e-12)

    # predict: a 3-slice volume, one click on slice 1, through the command line
    array = (np.stack([image * 0.5, image, image * 0.7]) * 1000.0).astype(np.float32)  # (z, y, x)
    path = write_nifti(tmp_path / "scan.nii.gz", np.ascontiguousarray(array.transpose(2, 1, 0)), zooms=(1, 1, 1))
    volume = read_volume(path)
    x, y = CLICKS[1]
    out = tmp_path / "mask.nii.gz"
    argv = ["predict", str(path), "--run", str(runs["single"]), "--points", f"[[{x}, {y}, 1, 1]]", "--out", str(out)]
    assert main([*argv, "--device", "cpu", "--one-click", "trained"]) == 0
    written = read_volume(out).array
    preset = "mr"  # the run's preprocessing is unset: predict_volume's default
    plane = volume_slice(preprocess_volume(volume.array, preset), 1, 0, preset)
    token0.set_image(plane, preprocessed=True)
    single = token0.predict(points=np.array([[x, y]]), labels=np.array([1]), multimask_output=False).masks[0, 0]
    three = token0.predict(points=np.array([[x, y]]), labels=np.array([1]), multimask_output=True)
    assert np.array_equal(written[1] == 1, single) and not written[[0, 2]].any()
    assert not np.array_equal(single, three.masks[0, int(np.argmax(three.scores[0]))])  # the rules differ here


@pytest.mark.slow
def test_the_onnx_runtime_follows_the_exported_run_under_the_trained_rule(tmp_path):
    from samadapt.export.onnx import export_onnx
    from samadapt.export.runtime import OnnxPredictor, load_export
    from samadapt.inference import load_predictor
    from samadapt.runs import Run
    from tests.conftest import make_tiny_sam
    from tests.peft.test_peft import randomise_peft_weights

    model = make_tiny_sam()
    config = PeftConfig(method="lora", lora=LoRAConfig(decoder=True))
    apply_peft(model, config)
    randomise_peft_weights(model)
    manifest = Manifest("tiny", "0" * 64, config.to_dict(), classes={1: "a"}, prompt={"kind": "point"})
    run = Run(model=model.eval(), name="tiny", classes={1: "a"}, manifest=manifest, one_click="trained")
    assert run.select_single_click is False
    export_onnx(run, tmp_path / "single")
    assert OnnxPredictor(tmp_path / "single").select_single_click is True  # the default rule
    assert load_export(tmp_path / "single").select_single_click is True
    onnx = load_predictor(tmp_path / "single", "onnxruntime", one_click="trained")
    assert onnx.select_single_click is False and onnx.run.select_single_click is False
    image = np.random.default_rng(0).random((128, 128)).astype(np.float32)
    onnx.set_image(image, preprocessed=True)
    differed = 0
    for x, y in ((40, 50), (90, 30), (64, 64), (20, 100)):
        prompt = dict(points=np.array([[x, y]]), labels=np.array([1]))
        answer, token0 = onnx.predict(**prompt), onnx.predict(**prompt, multimask_output=False)
        assert np.array_equal(answer.low_res_logits, token0.low_res_logits)
        three = onnx.predict(**prompt, multimask_output=True)
        differed += not np.allclose(token0.low_res_logits[0, 0], three.low_res_logits[0, np.argmax(three.scores[0])])
    assert differed
    # the same graphs, the run manifest of a multimask run, of a bare model (none), and of an old export
    for name, run_manifest, selects in (
        ("multimask", {**manifest.to_dict(), "outputs": {"masks": "multimask", "iou_head": False}}, True),
        ("bare", {}, True),
        ("old", {k: v for k, v in manifest.to_dict().items() if k != "outputs"}, False),
    ):
        shutil.copytree(tmp_path / "single", tmp_path / name)
        path = tmp_path / name / "manifest.json"
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "run_manifest": run_manifest}))
        predictor = load_predictor(tmp_path / name, "onnxruntime", one_click="trained")
        assert predictor.select_single_click is selects, name
        exported = dataclasses.replace(load_export(tmp_path / name), one_click="trained")
        assert exported.select_single_click is selects, name
        assert OnnxPredictor(tmp_path / name, select_single_click=not selects).select_single_click is not selects
    # load_predictor gives the onnxruntime predictor the run's own rule, or the one it is given
    assert load_predictor(run, "onnxruntime").select_single_click is False
    assert load_predictor(run, "onnxruntime", one_click="best").select_single_click is True
    assert Predictor.for_run(dataclasses.replace(run, one_click="best"), "cpu").select_single_click is True
