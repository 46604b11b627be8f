"""Exemplar selection and exemplar-guided synthesis (Cheap Lunch) on tiny synthetic data."""

import argparse
import json

import nibabel as nib
import numpy as np
import pytest

from samadapt.data.datasets import SliceDataset, load_dataset
from samadapt.data.synthesis import (
    SynthesisConfig,
    background_slices,
    inpaint_objects,
    select_exemplars,
    synthesize,
    write_synthetic_dataset,
)
from samadapt.errors import DataError

SIDE = 40


def _write_case(root, name, image, label):
    # samadapt arrays are (Z, Y, X); NIfTI stores (X, Y, Z)
    nib.save(
        nib.Nifti1Image(image.transpose(2, 1, 0).astype(np.float32), np.eye(4)), root / "imagesTr" / f"{name}.nii.gz"
    )
    nib.save(
        nib.Nifti1Image(label.transpose(2, 1, 0).astype(np.uint8), np.eye(4)), root / "labelsTr" / f"{name}.nii.gz"
    )


@pytest.fixture
def tiny_msd(tmp_path):
    return write_tiny_msd(tmp_path / "tiny")


def write_tiny_msd(root):
    """Two cases of 10 slices, 40 x 40, classes 1 (square) and 2 (disc) on a textured background.

    Case a: class 1 in slices 2-6, class 2 in 4-5 (larger in 5): the richest slice is 5. Slice 0 is blank.
    Case b: class 1 in slices 3-5, class 2 in 3 and 8: the richest slice is 3.
    """
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    layout = {"a": {1: range(2, 7), 2: range(4, 6)}, "b": {1: range(3, 6), 2: (3, 8)}}
    for name, classes in layout.items():
        image = 0.2 + 0.1 * rng.random((10, SIDE, SIDE))
        label = np.zeros((10, SIDE, SIDE), np.uint8)
        for z in classes[1]:
            label[z, 8:16, 8:16] = 1
        for z in classes[2]:
            radius = 7 if (name, z) == ("a", 5) else 5
            label[z][(yy - 27) ** 2 + (xx - 27) ** 2 <= radius**2] = 2
        image[label == 1] = 0.8
        image[label == 2] = 0.6
        if name == "a":
            image[0] = 0.0  # blank slice: never a background
        _write_case(root, name, image, label)
    meta = {
        "name": "tiny",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "square", "2": "disc"},
        "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in layout],
        "samadapt": {"preprocessing": "minmax", "axis": 0},
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _position(slices, i):
    return slices.slices[i][:2]


def test_most_classes_picks_richest_slice_per_volume(tiny_msd):
    slices = SliceDataset(load_dataset(tiny_msd))
    chosen = select_exemplars(slices, 2, [1, 2], strategy="most_classes")
    assert sorted(_position(slices, i) for i in chosen) == [("a", 5), ("b", 3)]
    # auto means most_classes for several classes
    assert select_exemplars(slices, 2, [1, 2]) == chosen


def test_more_exemplars_than_volumes_skips_neighbouring_slices(tiny_msd):
    slices = SliceDataset(load_dataset(tiny_msd))
    chosen = select_exemplars(slices, 4, [1, 2], strategy="most_classes")
    picked = sorted(_position(slices, i) for i in chosen)
    assert picked == [("a", 2), ("a", 5), ("b", 3), ("b", 8)]
    # asking for more than the non-adjacent slices falls back to the skipped ones, still without repeats
    chosen = select_exemplars(slices, 8, [1, 2], strategy="most_classes")
    assert len(set(chosen)) == 8


def test_random_selection_and_errors(tiny_msd):
    slices = SliceDataset(load_dataset(tiny_msd))
    chosen = select_exemplars(slices, 3, [2], seed=1)  # auto -> random for one class
    assert len(set(chosen)) == 3
    assert all(2 in slices.slices[i][2] for i in chosen)
    assert chosen == select_exemplars(slices, 3, [2], strategy="random", seed=1)
    with pytest.raises(DataError, match="only 4 slices"):
        select_exemplars(slices, 5, [2])
    with pytest.raises(DataError, match="not in the dataset"):
        select_exemplars(slices, 1, [7])
    with pytest.raises(ValueError, match="strategy"):
        select_exemplars(slices, 1, [1], strategy="best")


def test_backgrounds_are_target_free_and_not_blank(tiny_msd):
    slices = SliceDataset(load_dataset(tiny_msd))
    found = background_slices(slices, [1, 2])
    expected = {("a", z) for z in (1, 7, 8, 9)} | {("b", z) for z in (0, 1, 2, 6, 7, 9)}
    assert {_position(slices, i) for i in found} == expected
    # only class 2 targeted: slices with class 1 alone qualify too
    assert ("a", 3) in {_position(slices, i) for i in background_slices(slices, [2])}
    limited = background_slices(slices, [1, 2], limit=3, seed=4)
    assert len(limited) == 3 and set(limited) <= set(found)
    assert limited == background_slices(slices, [1, 2], limit=3, seed=4)


def _square_exemplar(side=64, top=20, left=24, size=20):
    image = np.zeros((side, side), np.float32)
    label = np.zeros((side, side), np.int64)
    image[top : top + size, left : left + size] = 1.0
    label[top : top + size, left : left + size] = 1
    return {"image": image, "label": label}


def _centroid(mask):
    return np.argwhere(mask).mean(axis=0)


def test_labels_stay_aligned_with_pasted_objects():
    exemplar = _square_exemplar()
    items = synthesize([exemplar], [np.zeros((64, 64), np.float32)], 20, SynthesisConfig(), seed=3)
    origin = _centroid(exemplar["label"] > 0)
    for item in items:
        bright, mask = item["image"] > 0.5, item["label"] > 0
        assert item["image"].dtype == np.float32 and item["label"].dtype == np.int64
        assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
        iou = (bright & mask).sum() / (bright | mask).sum()
        assert iou > 0.9
        assert np.linalg.norm(_centroid(mask) - origin) < 0.15 * 64


def test_objects_are_clipped_to_the_image():
    # an object on the border, pushed further out by jitter: what is left stays inside and aligned
    exemplar = _square_exemplar(top=0, left=50, size=14)
    config = SynthesisConfig(jitter=0.2, blur_sigma=(0.0, 0.0))
    for item in synthesize([exemplar], [np.zeros((64, 64), np.float32)], 10, config, seed=0):
        assert item["label"].shape == (64, 64)
        assert np.array_equal(item["image"] > 0.5, item["label"] > 0)


def test_multiclass_merge_keeps_every_class_near_its_position():
    image = np.full((64, 64), 0.1, np.float32)
    label = np.zeros((64, 64), np.int64)
    label[8:22, 8:22], image[8:22, 8:22] = 1, 0.9
    label[40:56, 38:58], image[40:56, 38:58] = 2, 0.6
    background = np.random.default_rng(0).uniform(0.0, 0.2, (64, 64)).astype(np.float32)
    items = synthesize([{"image": image, "label": label}], [background], 8, seed=5)
    for item in items:
        for c in (1, 2):
            mask = item["label"] == c
            assert mask.any()
            assert np.linalg.norm(_centroid(mask) - _centroid(label == c)) < 0.15 * 64
    # restricted to one class, the other is neither pasted nor labelled
    only = synthesize([{"image": image, "label": label}], [background], 2, seed=5, classes=[2])
    assert all(set(np.unique(item["label"])) == {0, 2} for item in only)


def test_same_seed_same_data():
    exemplars = [_square_exemplar(), _square_exemplar(top=5, left=5, size=10)]
    background = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    first = synthesize(exemplars, [background], 6, seed=11)
    second = synthesize(exemplars, [background], 6, seed=11)
    other = synthesize(exemplars, [background], 6, seed=12)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
    assert any(not np.array_equal(a["image"], c["image"]) for a, c in zip(first, other, strict=True))


@pytest.mark.parametrize("count", [1, 10])
def test_output_size_is_fixed_whatever_the_exemplar_count(count):
    exemplars = [_square_exemplar(top=10 + 2 * k, left=10 + k, size=8) for k in range(count)]
    items = synthesize(exemplars, [np.zeros((64, 64), np.float32)], 25, seed=0)
    assert len(items) == 25
    used = [item["exemplar"] for item in items]
    assert set(used) == set(range(count))  # round robin uses them all
    assert max(used.count(k) for k in range(count)) - min(used.count(k) for k in range(count)) <= 1


def test_background_of_another_shape_is_fitted():
    items = synthesize([_square_exemplar()], [np.ones((40, 90), np.float32) * 0.3], 2, seed=0)
    assert all(item["image"].shape == (64, 64) for item in items)


def test_config_validation():
    with pytest.raises(ValueError, match="scale"):
        SynthesisConfig(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="flip_prob"):
        SynthesisConfig(flip_prob=1.5)
    with pytest.raises(ValueError, match="jitter"):
        SynthesisConfig(jitter=-0.1)
    with pytest.raises(ValueError, match="background"):
        synthesize([_square_exemplar()], [], 1)


def test_inpaint_removes_objects():
    exemplar = _square_exemplar()
    filled = inpaint_objects(exemplar["image"], exemplar["label"])
    assert filled.max() < 0.1


def test_written_dataset_loads_back(tmp_path):
    exemplar = _square_exemplar()
    background = np.random.default_rng(2).uniform(0.0, 0.3, (64, 64)).astype(np.float32)
    background[0, 0], background[-1, -1] = 0.0, 1.0  # full range, so minmax on reading changes nothing
    items = synthesize([exemplar], [background], 3, SynthesisConfig(background_rotation=(0, 0)), seed=0)
    meta = write_synthetic_dataset(items, tmp_path / "out", {1: "square"})
    assert (tmp_path / "out" / "preview.png").stat().st_size > 0
    assert json.loads(meta.read_text())["samadapt"] == {"preprocessing": "minmax", "axis": 0}
    slices = SliceDataset(load_dataset(tmp_path / "out"))
    assert len(slices) == 3
    for k, item in enumerate(items):
        assert np.array_equal(slices[k]["label"], item["label"])
        assert np.abs(slices[k]["image"] - item["image"]).max() < 0.02


def test_synth_command(tiny_msd, tmp_path, capsys):
    from samadapt.cli.synth import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "synth"
    args = parser.parse_args(
        ["synth", "--data", str(tiny_msd), "--exemplars", "3", "--size", "7", "--out", str(out), "--seed", "1"]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "case a slice 5" in printed and str(out / "preview.png") in printed
    slices = SliceDataset(load_dataset(out))
    assert len(slices) == 7
    assert {c for _, _, present in slices.slices for c in present} == {1, 2}
