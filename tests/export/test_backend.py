"""The backend switch (``inference.load_predictor``): predict_volume / samadapt predict on onnxruntime give torch's
labels, from an export directory or from a run exported on the fly; an export directory is refused by the torch
backend."""

import numpy as np
import pytest

from samadapt.cli import main
from samadapt.data.io import read_volume
from samadapt.export.onnx import export_onnx
from samadapt.export.runtime import ExportedRun, OnnxPredictor
from samadapt.inference import export_dir_for, load_predictor
from samadapt.predict import predict_volume
from tests.data.conftest import write_nifti
from tests.export.test_onnx import tiny_run
from tests.test_predict_volume import two_objects


def test_prompted_volume_on_onnxruntime_equals_torch():
    run = tiny_run("lora")
    volume, _ = two_objects(depth=7, side=64)
    boxes = np.array([[10, 10, 1, 30, 30, 5, 1], [35, 36, 2, 56, 53, 4, 1]], np.float32)
    expected = predict_volume(run, volume, boxes=boxes, device="cpu")
    got = predict_volume(run, volume, boxes=boxes, predictor=load_predictor(run, "onnxruntime"))
    assert expected.any()
    assert np.mean(got == expected) >= 0.999
    assert export_dir_for(run) == export_dir_for(run)  # exported once per model
    assert isinstance(load_predictor(run, "onnxruntime"), OnnxPredictor)
    with pytest.raises(ValueError, match="unknown backend"):
        load_predictor(run, "tensorrt")


def test_semantic_volume_from_an_export_directory_equals_torch(tmp_path):
    run = tiny_run("lora", task="semantic")
    run.manifest.preprocessing = "minmax"
    export_onnx(run, tmp_path)
    predictor = load_predictor(tmp_path, "onnxruntime")
    exported = predictor.run
    assert isinstance(exported, ExportedRun) and exported.task == "semantic"
    volume, _ = two_objects(depth=3, side=48)
    expected = predict_volume(run, volume, device="cpu")
    got = predict_volume(exported, volume, predictor=predictor)
    assert np.mean(got == expected) >= 0.999


def test_predict_command_on_onnxruntime(tmp_path, capsys):
    run = tiny_run("msa")
    export_onnx(run, tmp_path / "export")
    volume, _ = two_objects(depth=5, side=64)
    write_nifti(tmp_path / "scan.nii.gz", volume.array.transpose(2, 1, 0))  # (Z, Y, X) -> (i, j, k)
    box = "[[10, 10, 1, 30, 30, 3]]"
    out = tmp_path / "mask.nii.gz"
    args = ["predict", str(tmp_path / "scan.nii.gz"), "--run", str(tmp_path / "export"), "--boxes", box]
    assert main([*args, "--backend", "onnxruntime", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    labels = read_volume(out).array
    assert labels.shape == volume.array.shape
    assert main([*args, "--out", str(tmp_path / "other.nii.gz")]) == 2  # an export on the torch backend
    assert "--backend onnxruntime" in capsys.readouterr().err


def test_evaluate_an_export_directory_writes_its_report(tmp_path):
    """An export's run manifest is a dict: the report's resume key reads it as such (class 1 of the run: disc)."""
    from samadapt.eval.evaluate import evaluate
    from tests.test_cli import tiny_dataset

    run = tiny_run("lora")
    export_onnx(run, tmp_path / "export")
    data = tiny_dataset(tmp_path / "tiny")
    predictor = load_predictor(tmp_path / "export", "onnxruntime")
    metrics = evaluate(None, data, "box", out=tmp_path / "report", predictor=predictor, progress=False)
    assert set(metrics["per_class"]) == {"disc"} and (tmp_path / "report" / "report.html").exists()
    again = evaluate(None, data, "box", out=tmp_path / "report", predictor=predictor, progress=False)
    assert again["per_class"] == metrics["per_class"]  # the finished volumes read back
