"""The inference seam: both backends implement one protocol and return one ``Prediction``; ``load_predictor`` is the
only reader of a backend's name; the deployment's numpy geometry equals the torch one; a predictor handed to
``predict_volume`` may be reused across volumes; no cycle between predict, export and inference."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import samadapt.export.runtime as runtime
import samadapt.predict as predict
from samadapt.errors import ConfigError, RunError
from samadapt.export.onnx import export_onnx
from samadapt.export.runtime import OnnxPredictor
from samadapt.inference import baseline_predictor, load_predictor
from samadapt.predict import Predictor, predict_volume
from samadapt.prediction import Prediction, SegmentationPredictor
from samadapt.transforms import InputGeometry
from tests.export.test_onnx import image, tiny_run
from tests.test_predict_volume import two_objects

SRC = Path(__file__).resolve().parents[1] / "src" / "samadapt"


# -- the numpy geometry of the torch-free runtime equals transforms.InputGeometry ---------------------------------


@pytest.mark.parametrize("original", [(100, 120), (120, 100), (37, 53), (300, 170), (1, 64), (256, 256), (511, 3)])
@pytest.mark.parametrize("size", [128, 1024])
def test_numpy_geometry_equals_torch_geometry_on_points_boxes_and_masks(original, size):
    rng = np.random.default_rng(sum(original) + size)
    torch_geometry, numpy_geometry = InputGeometry(original, size), runtime.InputGeometry(original, size)
    assert numpy_geometry.resized == torch_geometry.resized
    h, w = original
    points = rng.uniform(0, [w, h], size=(3, 5, 2)).astype(np.float32)  # (P, N, 2) and (N, 2) and one point
    for clicks in (points, points[0], points[0, :1], np.array([[0.0, 0.0], [w, h]], np.float32)):
        np.testing.assert_allclose(numpy_geometry.coords_to_input(clicks), torch_geometry.coords_to_input(clicks))
        on_device = torch_geometry.coords_to_input(torch.from_numpy(clicks)).numpy()
        np.testing.assert_allclose(numpy_geometry.coords_to_input(clicks), on_device)
    corners = np.sort(rng.uniform(0, [w, h, w, h], size=(4, 4)).reshape(4, 2, 2), axis=1).reshape(4, 4)
    for boxes in (corners.astype(np.float32), corners[0], np.array([0, 0, w, h], np.float32)):
        np.testing.assert_allclose(numpy_geometry.boxes_to_input(boxes), torch_geometry.boxes_to_input(boxes))
    for from_size in (size // 4, size):  # the low-res logits, and masks already on the input grid
        logits = rng.standard_normal((2, 3, from_size, from_size)).astype(np.float32)
        expected = torch_geometry.masks_to_original(torch.from_numpy(logits), from_size=from_size).numpy()
        got = numpy_geometry.masks_to_original(logits, from_size=from_size)
        assert got.shape == (2, 3, *original)
        # fp32 taps summed in another order; a 1024 grid shrunk ~20x (to 37 x 53) drifts most: 1.1e-4 measured
        np.testing.assert_allclose(got, expected, atol=2e-5 if size < 1024 else 2e-4, rtol=0)


# -- one protocol, one Prediction ----------------------------------------------------------------------------------


def test_both_backends_implement_the_protocol_and_return_the_one_prediction(tmp_path):
    run = tiny_run("lora")
    export_onnx(run, tmp_path)
    torch_predictor = load_predictor(run, "torch", device="cpu", cache_size=2)
    onnx_predictor = load_predictor(tmp_path, "onnxruntime", cache_size=2)
    assert predict.Prediction is runtime.Prediction is Prediction  # the modules re-export the one class
    assert isinstance(torch_predictor, Predictor) and isinstance(onnx_predictor, OnnxPredictor)
    assert torch_predictor.run is run and onnx_predictor.run.path == tmp_path
    box = np.array([20, 25, 80, 60], np.float32)
    answers = []
    for predictor in (torch_predictor, onnx_predictor):
        assert isinstance(predictor, SegmentationPredictor)
        # each predictor's attribute, from the run's one-click rule (the default: SAM's best of three)
        assert predictor.select_single_click is run.select_single_click is True
        assert not predictor.is_cached("slice 1")
        predictor.set_image(image(), preprocessed=True, cache_key="slice 1")
        assert predictor.is_cached("slice 1")
        answer = predictor.predict(boxes=box)
        assert type(answer) is Prediction and answer.masks.shape == (1, 1, 100, 120)
        answers.append(answer)
    np.testing.assert_allclose(answers[1].scores, answers[0].scores, atol=1e-3)
    with pytest.raises(ConfigError, match="takes no text prompt"):
        onnx_predictor.predict(text="the lesion")


def test_load_predictor_refuses_what_it_cannot_honour(tmp_path):
    run = tiny_run(None)
    export_onnx(run, tmp_path)
    with pytest.raises(ConfigError, match="unknown backend 'tensorrt'"):
        load_predictor(run, "tensorrt")
    with pytest.raises(RunError, match="--backend onnxruntime"):
        load_predictor(tmp_path, "torch")
    with pytest.raises(RunError, match="onnxruntime backend only"):
        load_predictor(load_predictor(tmp_path, "onnxruntime").run, "torch")
    with pytest.raises(ConfigError, match="fixed at export"):
        load_predictor(tmp_path, "onnxruntime", blend=0.5)
    with pytest.raises(ConfigError, match="blend applies to a run loaded here"):
        load_predictor(run, blend=0.5)
    no_run = Predictor(run.model, device="cpu")
    with pytest.raises(ConfigError, match="the baseline needs the predictor's run"), baseline_predictor(no_run):
        pass


def test_the_torch_baseline_keeps_device_and_precision_and_turns_the_adapters_off():
    run = tiny_run("lora")
    adapted = load_predictor(run, device="cpu", precision="fp32")
    adapted.set_image(image(), preprocessed=True)
    box = np.array([20, 25, 80, 60], np.float32)
    with_adapters = adapted.predict(boxes=box).low_res_logits
    bare = Predictor(tiny_run(None).model, device="cpu")  # the same seed: tiny_run's base weights without LoRA
    bare.set_image(image(), preprocessed=True)
    with baseline_predictor(adapted) as base:
        assert base.device == adapted.device and base.precision == "fp32"
        base.set_image(image(), preprocessed=True)
        without = base.predict(boxes=box).low_res_logits
    torch.testing.assert_close(without, bare.predict(boxes=box).low_res_logits)
    assert not torch.allclose(without, with_adapters, atol=1e-3)


# -- consumers take a predictor ------------------------------------------------------------------------------------


def test_a_predictor_reused_across_volumes_gives_each_volume_its_own_labels():
    """predict_volume caches embeddings per slice: the keys of one volume never answer for another's slices."""
    run = tiny_run("lora")
    first, _ = two_objects(depth=7, side=64)
    second = type(first)(np.roll(first.array, 9, axis=2), first.spacing)
    boxes = np.array([[10, 10, 1, 30, 30, 5, 1], [35, 36, 2, 56, 53, 4, 1]], np.float32)
    alone = [predict_volume(run, volume, boxes=boxes, device="cpu") for volume in (first, second)]
    assert alone[0].any() and not np.array_equal(alone[0], alone[1])
    shared = load_predictor(run, device="cpu", cache_size=predict.VOLUME_CACHE)
    for volume, expected in zip((first, second), alone, strict=True):
        np.testing.assert_array_equal(predict_volume(run, volume, boxes=boxes, predictor=shared), expected)


# -- the layers ----------------------------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """Every samadapt module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("samadapt"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("samadapt"))
    return found


def test_the_backends_sit_below_the_seam_and_only_the_seam_reads_a_backend_name():
    below = [SRC / "prediction.py", SRC / "predict.py", *sorted((SRC / "export").glob("*.py"))]
    for path in below:
        upward = {m for m in _imports(path) if m.startswith(("samadapt.inference", "samadapt.eval", "samadapt.serve"))}
        assert not upward, f"{path.name} imports {upward}"
    assert not any(m.startswith("samadapt.export") for m in _imports(SRC / "predict.py"))
    assert not any(m == "samadapt.predict" for p in (SRC / "export").glob("*.py") for m in _imports(p))
    assert not {m for m in _imports(SRC / "prediction.py")} - {"samadapt"}  # the protocol imports nothing of ours
    for path in SRC.rglob("*.py"):
        if path.name == "inference.py" or "cli" in path.relative_to(SRC).parts:
            continue
        text = path.read_text()
        assert '"onnxruntime"' not in text and "backend ==" not in text, f"{path} reads a backend name"
