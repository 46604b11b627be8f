"""ONNX export and the onnxruntime predictor: same function as torch for the base model, LoRA, MSA and semantic runs;
numpy preprocessing equal to ``transforms.model_input``; manifest round trip; refused depth branch; no torch needed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnxruntime import InferenceSession

from samadapt.errors import ConfigError, UnsupportedExportError
from samadapt.export.geometry import InputGeometry as NumpyGeometry
from samadapt.export.geometry import model_input
from samadapt.export.onnx import export_model, export_onnx
from samadapt.export.runtime import (
    ExportedRun,
    OnnxPredictor,
    is_export_dir,
    load_export,
    read_export_manifest,
)
from samadapt.intensity import to_unit_range
from samadapt.models.mask_decoder import SlicePrior, make_semantic_decoder
from samadapt.peft import AdapterConfig, LoRAConfig, PeftConfig, apply_peft
from samadapt.predict import Predictor
from samadapt.runs import Manifest, Run
from samadapt.transforms import InputGeometry
from samadapt.transforms import model_input as torch_model_input
from tests.conftest import make_tiny_sam
from tests.peft.test_peft import randomise_peft_weights

ATOL = 1e-3  # logits, fp32
MIN_DICE = 0.999


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / float(total)


def image(shape=(100, 120), seed=0) -> np.ndarray:
    """A [0, 1] slice with a bright rectangle (something for the prompts to find)."""
    rng = np.random.default_rng(seed)
    img = rng.random(shape).astype(np.float32) * 0.3
    h, w = shape
    img[h // 4 : h // 2, w // 4 : 3 * w // 4] += 0.6
    return img


def tiny_run(method: str | None, task: str = "prompt", depth: bool = False) -> Run:
    model = make_tiny_sam()
    classes = {1: "a"}
    if task == "semantic":
        classes = {1: "a", 2: "b", 3: "c", 4: "d"}
        make_semantic_decoder(model.mask_decoder, len(classes))
        with torch.no_grad():  # class 4 starts as a copy of token 0 (background): trained heads differ, ties do not
            tokens = model.mask_decoder.mask_tokens.weight
            tokens.add_(torch.randn(tokens.shape, generator=torch.Generator().manual_seed(5)))
            # a trained position map (it starts at zero): the graph must carry it for the outputs to agree
            prior = model.mask_decoder.position_prior.weight
            prior.add_(torch.randn(prior.shape, generator=torch.Generator().manual_seed(6)) * 0.05)
    if method:
        config = PeftConfig(
            method=method,
            adapter=AdapterConfig(decoder=True),
            lora=LoRAConfig(decoder=True),
            depth=depth,
        )
        apply_peft(model, config)
        randomise_peft_weights(model)
    peft = config.to_dict() if method else {}
    manifest = Manifest("tiny", "0" * 64, peft, task=task, classes=classes, preprocessing="mr", axis=0)
    return Run(model=model.eval(), name="tiny", task=task, classes=classes, manifest=manifest)


PROMPTS = [
    {"boxes": np.array([[30, 25, 90, 50], [5, 5, 60, 90]], np.float32)},
    {"points": np.array([[60, 35], [10, 80]], np.float32), "labels": np.array([1, 0])},
    {"points": np.array([[60, 35]], np.float32), "labels": np.array([1]), "boxes": np.array([28, 20, 95, 55])},
    {"boxes": np.array([[30, 25, 90, 50]], np.float32), "multimask_output": True},
    {"points": np.array([[[60, 35]], [[20, 70]]], np.float32), "labels": np.array([[1], [1]])},
]


def assert_same_predictions(torch_predictor, onnx_predictor, img, preprocessed=True):
    torch_predictor.set_image(img, preprocessed=preprocessed)
    onnx_predictor.set_image(img, preprocessed=preprocessed)
    np.testing.assert_allclose(onnx_predictor.embedding, torch_predictor.embedding.numpy(), atol=ATOL, rtol=0)
    for prompt in PROMPTS:
        expected, got = torch_predictor.predict(**prompt), onnx_predictor.predict(**prompt)
        np.testing.assert_allclose(got.low_res_logits, expected.low_res_logits.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(got.scores, expected.scores, atol=ATOL, rtol=0)
        assert got.masks.shape == expected.masks.shape
        assert dice(got.masks, expected.masks) >= MIN_DICE
    # a previous prediction as the mask prompt
    previous = torch_predictor.predict(**PROMPTS[0]).low_res_logits.numpy()
    prompt = {**PROMPTS[0], "mask_input": previous}
    expected, got = torch_predictor.predict(**prompt), onnx_predictor.predict(**prompt)
    np.testing.assert_allclose(got.low_res_logits, expected.low_res_logits.numpy(), atol=ATOL, rtol=0)


# -- preprocessing and geometry in numpy ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(100, 120), (120, 100), (128, 128), (300, 170), (37, 53), (64, 64, 3), (512, 400)])
def test_numpy_model_input_equals_torch_model_input(shape):
    img = np.random.default_rng(1).random(shape).astype(np.float32)
    expected, expected_geometry = torch_model_input(img, 128)
    got, geometry = model_input(img, 128)
    assert got.dtype == np.float32 and got.shape == tuple(expected.shape)
    assert geometry.resized == expected_geometry.resized
    np.testing.assert_allclose(got, expected.numpy(), atol=2e-6, rtol=0)


def test_the_raw_image_rule_by_hand_and_both_model_inputs_refuse_unpreprocessed_slices():
    raw = np.array([[0, 51], [255, 102]], np.uint8)
    np.testing.assert_allclose(to_unit_range(raw), [[0, 0.2], [1, 0.4]], atol=1e-7)
    np.testing.assert_allclose(to_unit_range(np.array([[-7, 3], [13, 3]], np.float32)), [[0, 0.5], [1, 0.5]])
    np.testing.assert_allclose(to_unit_range(np.array([[np.nan, 0], [1, 2]], np.float32)), [[0, 0], [0.5, 1]])
    assert not to_unit_range(np.full((3, 3), 5.0, np.float32)).any()  # a constant image: zeros, not NaN
    for make_input in (model_input, torch_model_input):  # the runtime's numpy input and the torch one
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\], this one spans \[0, 255\]"):
            make_input(raw.astype(np.float32), 128)


@pytest.mark.parametrize("original", [(100, 120), (300, 170), (256, 256), (40, 30)])
def test_numpy_masks_to_original_and_prompt_scaling_equal_torch(original):
    logits = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32)
    expected = InputGeometry(original, 256).masks_to_original(torch.from_numpy(logits), from_size=64).numpy()
    got = NumpyGeometry(original, 256).masks_to_original(logits, from_size=64)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    boxes = np.array([[3.5, 4, 20, 30], [0, 0, 10, 10]], np.float32)
    np.testing.assert_allclose(
        NumpyGeometry(original, 256).boxes_to_input(boxes), InputGeometry(original, 256).boxes_to_input(boxes)
    )


# -- equivalence of the graphs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [None, "lora", "msa", "msa+lora"])
def test_prompted_export_equals_torch(method, tmp_path):
    run = tiny_run(method)
    manifest = export_onnx(run, tmp_path)
    assert manifest["task"] == "prompt" and manifest["img_size"] == 128
    if method and "lora" in method:
        assert manifest["notes"]["lora_merged"] > 0
    if method and "msa" in method:
        assert manifest["notes"]["msa_adapters"] > 0
    assert_same_predictions(Predictor.for_run(run, "cpu", "fp32"), OnnxPredictor(tmp_path), image())


def test_export_leaves_the_model_untouched(tmp_path):
    run = tiny_run("lora")
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    export_onnx(run, tmp_path)
    after = run.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not run.model.training and not any(m.merged for m in run.model.modules() if hasattr(m, "merged"))


def test_semantic_export_equals_torch(tmp_path):
    run = tiny_run("lora", task="semantic")
    manifest = export_onnx(run, tmp_path)
    assert manifest["task"] == "semantic" and manifest["num_mask_tokens"] == 5
    assert manifest["classes"] == {"1": "a", "2": "b", "3": "c", "4": "d"}
    torch_predictor, onnx_predictor = Predictor.for_run(run, "cpu", "fp32"), OnnxPredictor(tmp_path)
    images = [image(seed=s) for s in range(3)]
    for img in images[:1]:
        torch_predictor.set_image(img, preprocessed=True)
        onnx_predictor.set_image(img, preprocessed=True)
        np.testing.assert_array_equal(onnx_predictor.predict_semantic(), torch_predictor.predict_semantic())
    with torch.inference_mode():
        embeddings = run.model.encode_image(torch.cat([torch_model_input(i, 128)[0] for i in images]))
        expected, _ = run.model.decode(embeddings)
    got = onnx_predictor.decoder.run(None, {"image_embeddings": embeddings.numpy()})[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=ATOL, rtol=0)
    labels, expected_labels = onnx_predictor.semantic_batch(images), torch_predictor.semantic_batch(images)
    assert labels.shape == expected_labels.shape == (3, 100, 120)
    assert (labels == expected_labels).mean() >= MIN_DICE
    with pytest.raises(ValueError, match="predict_semantic"):
        onnx_predictor.predict(boxes=np.array([1, 1, 20, 20]))


@pytest.mark.slow
def test_lite_medsam_export_equals_torch(tmp_path):
    from samadapt.runs import load_run

    run = load_run("lite_medsam", device="cpu")
    manifest = export_onnx(run, tmp_path)
    assert manifest["base_model"] == "lite_medsam" and len(manifest["base_sha256"]) == 64
    assert manifest["img_size"] == 256
    raw = (image((180, 220)) * 200).astype(np.uint8)  # a raw uint8 image: the /255 rule on both sides
    assert_same_predictions(Predictor.for_run(run, "cpu", "fp32"), OnnxPredictor(tmp_path), raw, preprocessed=False)
    # TinyViT pads its 128- and 64-token grids to whole windows: by concatenation, not by ScatterND over the grid
    ops = {node.op_type for node in onnx.load(str(tmp_path / manifest["files"]["image_encoder"]["path"])).graph.node}
    assert "Concat" in ops and "ScatterND" not in ops


def tiny_vit_run() -> Run:
    """A slim TinyViT SAM (LiteMedSAM's layout, 128 x 128): windows that pad at every attention stage, random batch
    norms and attention biases (constants at init, which would hide a wrong halo or a wrong window order)."""
    from samadapt.models.registry import assemble_sam
    from samadapt.models.tiny_vit import TinyViT
    from tests.models.test_tiny_vit import SLIM, randomize

    torch.manual_seed(0)
    encoder = TinyViT(img_size=128, **SLIM)
    randomize(encoder, seed=3)
    model = assemble_sam(encoder, 128, sam_normalisation=False).eval()
    return Run(model=model, name="tiny_vit", task="prompt", classes={1: "a"}, manifest=None)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("strip_rows", [1, 5, 23])
def test_exported_strips_equal_the_blocks(strip_rows, stride, tmp_path, monkeypatch):
    """An MBConv (stride 1) or a patch merging (stride 2) exported in strips of output rows (one row; 5, the last
    strip shorter; all rows in one strip) computes the block's numbers on onnxruntime, the image border included."""
    from samadapt.accel import accelerate
    from samadapt.accel import strips as conv_strips
    from samadapt.export.onnx import _export
    from samadapt.models import tiny_vit
    from tests.models.test_tiny_vit import randomize

    torch.manual_seed(0)
    block = tiny_vit.MBConv(8, 4.0) if stride == 1 else tiny_vit.PatchMerging((23, 17), 8, 32, stride=2)
    randomize(block, seed=2)
    block.eval()
    x = torch.randn(2, 8, 23, 17)
    with torch.no_grad():
        expected = block(x).numpy()  # the reference block, whole
    monkeypatch.setattr(conv_strips, "large_hidden", lambda x, hidden, itemsize: True)
    monkeypatch.setattr(conv_strips, "STRIP_BYTES", strip_rows * 17 * 32 * 4 * stride)
    accelerate(block, "onnx")
    _export(block, (x,), tmp_path / "block.onnx", ["x"], ["y"], {"x": {0: "batch"}, "y": {0: "batch"}}, 17)
    graph = onnx.load(str(tmp_path / "block.onnx")).graph
    out_rows = (23 - 1) // stride + 1
    assert sum(n.op_type == "Conv" for n in graph.node) == 3 * -(-out_rows // strip_rows)
    got = InferenceSession(str(tmp_path / "block.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    np.testing.assert_allclose(got[0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("strip_rows", [1, 5])
def test_tiny_vit_export_graph_forms_equal_torch(strip_rows, tmp_path, monkeypatch):
    """TinyViT's export-only graph forms: stage 0's MBConv in strips of rows (forced here: the slim model's stage is
    under the size they start at; 5 rows leave a shorter last strip) and the window attention with one transpose
    each way. Same numbers as torch."""
    from samadapt.accel import strips as conv_strips

    run = tiny_vit_run()
    hidden = run.model.image_encoder.layers[0].blocks[0].conv1.c.out_channels
    monkeypatch.setattr(conv_strips, "large_hidden", lambda x, hidden, itemsize: True)
    monkeypatch.setattr(conv_strips, "STRIP_BYTES", strip_rows * 128 * hidden * 4)
    export_onnx(run, tmp_path)
    graph = onnx.load(str(tmp_path / "image_encoder.onnx")).graph
    strips = -(-128 // strip_rows)
    stage0 = [n for n in graph.node if n.op_type == "Conv" and "/layers.0/blocks." in n.name]
    assert len(stage0) == 3 * strips * len(run.model.image_encoder.layers[0].blocks)
    attentions = {n.name.split("/attn/")[0] for n in graph.node if "/attn/" in n.name}
    transposes = [n for n in graph.node if n.op_type == "Transpose" and "/attn/" in n.name]
    # in, out and k's (onnxruntime folds that one into the product: FusedMatMul transB)
    assert len(attentions) == 4 and len(transposes) == 3 * len(attentions)
    assert_same_predictions(Predictor.for_run(run, "cpu", "fp32"), OnnxPredictor(tmp_path), image())
    images = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))  # the batch axis stays dynamic
    with torch.inference_mode():
        expected = run.model.encode_image(images).numpy()
    np.testing.assert_allclose(OnnxPredictor(tmp_path).encode(images.numpy()), expected, atol=ATOL, rtol=0)


# -- manifest, refusals, CLI ---------------------------------------------------------------------------------------


def test_manifest_round_trip(tmp_path):
    run = tiny_run("msa")
    written = export_onnx(run, tmp_path)
    assert is_export_dir(tmp_path) and not is_export_dir(tmp_path / "nothing")
    assert read_export_manifest(tmp_path) == json.loads((tmp_path / "manifest.json").read_text()) == written
    exported = load_export(tmp_path)
    assert isinstance(exported, ExportedRun)
    assert (exported.task, exported.classes, exported.name) == ("prompt", {1: "a"}, "tiny")
    assert exported.manifest["preprocessing"] == "mr" and exported.manifest["axis"] == 0
    assert written["peft"]["method"] == "msa" and written["base_sha256"] == "0" * 64
    assert written["samadapt_version"] and written["opset"] == 17
    assert written["preprocessing"]["pixel_mean"] == pytest.approx([123.675, 116.28, 103.53])
    OnnxPredictor(tmp_path, check_files=True)  # the checksums in the manifest are those of the files
    (tmp_path / "decoder.onnx").write_bytes((tmp_path / "decoder.onnx").read_bytes() + b"\0")
    with pytest.raises(ValueError, match="checksum"):
        OnnxPredictor(tmp_path, check_files=True)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ValueError, match="newer"):
        read_export_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format": "other"}))
    with pytest.raises(ValueError, match="not a samadapt ONNX export"):
        load_export(tmp_path)


def test_a_blended_run_exports_at_its_blend(tmp_path):
    """The graphs compute the run at the blend it is used at, and the manifest says which (peft.blend)."""
    from samadapt.peft import set_blend

    run = tiny_run("msa+lora")
    set_blend(run.model, 0.5)
    written = export_onnx(run, tmp_path)
    assert written["peft"]["blend"] == 0.5 and load_export(tmp_path).blend == 0.5
    assert_same_predictions(Predictor.for_run(run, "cpu", "fp32"), OnnxPredictor(tmp_path), image())
    with pytest.raises(ConfigError, match="load_run"):
        export_onnx(run, tmp_path / "again", blend=1.0)


def test_depth_branch_is_refused_unless_dropped(tmp_path):
    run = tiny_run("msa", depth=True)
    with pytest.raises(UnsupportedExportError, match="depth branch.*--drop-depth"):
        export_onnx(run, tmp_path)
    manifest = export_onnx(run, tmp_path, drop_depth=True)
    assert "excluded" in manifest["notes"]["depth_branch"]
    # one slice at a time, the torch model with its depth branch computes the same as the export without it
    assert_same_predictions(Predictor.for_run(run, "cpu", "fp32"), OnnxPredictor(tmp_path), image())


def test_task_and_decoder_must_agree(tmp_path):
    run = tiny_run(None)
    with pytest.raises(UnsupportedExportError, match="prompted"):
        export_model(run.model, tmp_path, task="semantic")


def test_export_command(tmp_path, capsys):
    from samadapt.cli import main

    assert main(["export", "--run", "no_such_run", "--out", str(tmp_path / "x")]) == 2
    assert "neither a run directory" in capsys.readouterr().err


# -- deployment without torch ------------------------------------------------------------------------------------

_NO_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
import numpy as np
import onnx
from samadapt.export.runtime import OnnxPredictor
p = OnnxPredictor(sys.argv[1])
img = np.random.default_rng(0).random((100, 120)).astype(np.float32)
p.set_image(img, preprocessed=True)
out = p.predict(boxes=np.array([[30, 25, 90, 50]], np.float32))
assert out.masks.shape == (1, 1, 100, 120), out.masks.shape
assert "torch" not in sys.modules
print("ok", int(out.masks.sum()))
"""


def test_runtime_needs_no_torch(tmp_path):
    run = tiny_run("lora")
    export_onnx(run, tmp_path)
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(tmp_path)],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_the_decoder_session_does_not_spin_between_runs(tmp_path):
    """Two sessions, two thread pools: the decoder's idle workers must not spin on the cores the encoder needs next."""
    export_onnx(tiny_run("lora"), tmp_path)
    predictor = OnnxPredictor(tmp_path, threads=2)
    spinning = "session.intra_op.allow_spinning"
    assert predictor.decoder.get_session_options().get_session_config_entry(spinning) == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # the encoder keeps onnxruntime's default
        predictor.encoder.get_session_options().get_session_config_entry(spinning)
    assert predictor.encoder.get_session_options().intra_op_num_threads == 2


def test_a_run_with_the_slice_position_exports_it_as_a_decoder_input(tmp_path):
    """model.slice_position: the semantic decoder graph takes each slice's position, and agrees with torch on it;
    without a position it refuses, as the torch decoder does."""
    run = tiny_run(None, task="semantic")
    prior = SlicePrior(run.model.mask_decoder.transformer_dim)
    with torch.no_grad():  # trained (it starts at zero): the position must change the outputs
        prior.proj.weight.normal_(generator=torch.Generator().manual_seed(7))
    run.model.mask_decoder.slice_prior = prior
    manifest = export_onnx(run, tmp_path)
    assert manifest["slice_position"] is True
    torch_predictor, onnx_predictor = Predictor.for_run(run, "cpu", "fp32"), OnnxPredictor(tmp_path)
    images, positions = [image(seed=s) for s in range(3)], [0.0, 0.4, 1.0]
    with torch.inference_mode():
        embeddings = run.model.encode_image(torch.cat([torch_model_input(i, 128)[0] for i in images]))
        expected, _ = run.model.decode(embeddings, slice_position=torch.tensor(positions))
        elsewhere, _ = run.model.decode(embeddings, slice_position=torch.tensor([0.9, 0.1, 0.5]))
    assert not torch.allclose(expected, elsewhere, atol=1e-2)
    feeds = {"image_embeddings": embeddings.numpy(), "slice_position": np.array(positions, np.float32)}
    np.testing.assert_allclose(onnx_predictor.decoder.run(None, feeds)[0], expected.numpy(), atol=ATOL, rtol=0)
    labels = onnx_predictor.semantic_batch(images, positions)
    assert (labels == torch_predictor.semantic_batch(images, positions)).mean() >= MIN_DICE
    onnx_predictor.set_image(images[1], preprocessed=True)
    torch_predictor.set_image(images[1], preprocessed=True)
    agree = onnx_predictor.predict_semantic(0.4) == torch_predictor.predict_semantic(0.4)
    assert agree.mean() >= MIN_DICE
    with pytest.raises(ValueError, match="model.slice_position"):
        onnx_predictor.semantic_batch(images)
    plain = tiny_run(None, task="semantic")  # a graph without the input ignores positions, as Predictor does
    export_onnx(plain, tmp_path / "plain")
    np.testing.assert_array_equal(
        OnnxPredictor(tmp_path / "plain").semantic_batch(images, positions),
        OnnxPredictor(tmp_path / "plain").semantic_batch(images),
    )
