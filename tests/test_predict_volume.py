"""Whole-volume prediction: several objects with their class ids, any slicing axis, batched semantic slices, and
folder prediction that skips finished cases and never leaves a partial file."""

import numpy as np
import pytest

import samadapt.predict as predict
from samadapt.data.io import Volume, read_volume
from samadapt.eval.metrics import dice
from samadapt.models.mask_decoder import make_semantic_decoder
from samadapt.predict import Predictor, predict_folder, predict_volume
from samadapt.runs import Manifest, Run, load_run
from tests.conftest import make_tiny_sam
from tests.data.conftest import write_nifti


def two_objects(depth=9, side=96):
    """A (Z, Y, X) volume with a bright ball (class 1) and a bright box (class 2) on a dark, noisy background."""
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:depth, :side, :side]
    truth = np.zeros((depth, side, side), np.int16)
    truth[((zz - 4) / 3.5) ** 2 + ((yy - 30) / 14) ** 2 + ((xx - 30) / 14) ** 2 <= 1] = 1
    truth[2:7, 55:80, 50:85] = 2
    image = 100 + 10 * rng.standard_normal(truth.shape) + 800 * (truth > 0)
    return Volume(image.astype(np.float32), (2.0, 1.0, 1.0)), truth


def bare_run(preset="minmax", axis=0) -> Run:
    run = load_run("lite_medsam", device="cpu")
    run.manifest = Manifest("lite_medsam", "", {}, preprocessing=preset, axis=axis)
    run.classes = {1: "ball", 2: "box"}
    return run


@pytest.mark.slow
def test_several_volume_boxes_are_propagated_and_written_with_their_class_ids():
    volume, truth = two_objects()
    # (x0, y0, z0, x1, y1, z1, class): each object's extent
    boxes = np.array([[16, 16, 1, 44, 44, 7, 1], [50, 55, 2, 84, 79, 6, 2]], np.float32)
    labels = predict_volume(bare_run(), volume, boxes=boxes)
    assert labels.shape == truth.shape
    for class_id in (1, 2):
        assert dice(labels == class_id, truth == class_id) > 0.7, class_id
    assert labels[4, 30, 30] == 1 and labels[4, 67, 67] == 2  # each object's centre carries its own class id
    assert not labels[0].any() and not labels[8].any()  # propagation stops where the objects end


@pytest.mark.slow
def test_the_run_axis_decides_how_the_volume_is_sliced():
    volume, truth = two_objects()
    turned = Volume(np.ascontiguousarray(volume.array.transpose(1, 0, 2)), (1.0, 2.0, 1.0))  # (Y, Z, X)
    boxes = np.array([[50, 55, 2, 84, 79, 6, 2]], np.float32)  # voxel (x, y, z) of the original
    straight = predict_volume(bare_run(axis=0), volume, boxes=boxes)
    # the same object in the turned volume: its voxel y and z swap; slicing along axis 1 gives the same planes
    turned_boxes = np.array([[50, 2, 55, 84, 6, 79, 2]], np.float32)
    sideways = predict_volume(bare_run(axis=1), turned, boxes=turned_boxes)
    np.testing.assert_array_equal(sideways.transpose(1, 0, 2), straight)


def semantic_run(classes=2) -> Run:
    model = make_tiny_sam(64)
    make_semantic_decoder(model.mask_decoder, classes)
    facts = Manifest("tiny", "0" * 64, {}, task="semantic", preprocessing="minmax", axis=0)
    return Run(model.eval(), "tiny", "semantic", {1: "a", 2: "b"}, facts)


def test_batched_semantic_slices_equal_one_at_a_time():
    run = semantic_run()
    volume, _ = two_objects(depth=5, side=40)
    one = predict_volume(run, volume, device="cpu", batch_size=1)
    batched = predict_volume(run, volume, device="cpu", batch_size=3)
    assert np.mean(one == batched) > 0.999


def test_folder_prediction_skips_finished_cases_and_keeps_the_grid(tmp_path, monkeypatch):
    run = semantic_run()
    rng = np.random.default_rng(0)
    for name in ("a_0000", "b_0000", "c_0000"):
        write_nifti(tmp_path / "imagesTs" / f"{name}.nii.gz", rng.normal(size=(24, 20, 3)).astype(np.float32))
    out = tmp_path / "predictions"
    written = predict_folder(run, tmp_path / "imagesTs", out, device="cpu", progress=False)
    assert sorted(p.name for p in written) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    image, label = read_volume(tmp_path / "imagesTs" / "a_0000.nii.gz"), read_volume(out / "a.nii.gz")
    assert label.array.shape == image.array.shape
    np.testing.assert_allclose(label.affine, image.affine)

    (out / "b.nii.gz").unlink()  # as if the job had been killed before case b was written
    calls = []
    real = predict.predict_volume
    monkeypatch.setattr(predict, "predict_volume", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = predict_folder(run, tmp_path / "imagesTs", out, device="cpu", progress=False)
    assert [p.name for p in again] == ["b.nii.gz"] and len(calls) == 1

    # a write that fails half-way leaves nothing under the final name (and no temporary file)
    (out / "c.nii.gz").unlink()
    monkeypatch.setattr("samadapt.data.io._write_label_file", lambda *a: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(OSError, match="full"):
        predict_folder(run, tmp_path / "imagesTs", out, device="cpu", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]


def test_a_prompted_run_refuses_folder_prediction(tmp_path):
    run = Run(make_tiny_sam(64), "tiny", "prompt", {1: "a"})
    with pytest.raises(ValueError, match="semantic run"):
        predict_folder(run, tmp_path, tmp_path / "out")


def test_embeddings_are_cached_by_key():
    model = make_tiny_sam(64)
    calls = []
    encode = model.encode_image
    model.encode_image = lambda images: calls.append(1) or encode(images)
    predictor = Predictor(model, device="cpu", cache_size=2)
    image = np.random.default_rng(0).random((30, 30)).astype(np.float32)
    for key in (0, 1, 0, 1, 2, 0):  # 0 is dropped when 2 arrives (least recently used)
        predictor.set_image(image, preprocessed=True, cache_key=key)
    assert len(calls) == 4
