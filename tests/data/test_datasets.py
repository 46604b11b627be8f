"""Dataset layouts, the slice view and its cached index, splits, and the errors bad datasets get."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from samadapt.data import SliceDataset, load_dataset, split_cases, split_dataset
from samadapt.data import datasets as datasets_module
from samadapt.errors import DataError


def test_msd_layout_loads_and_slices(msd):
    spec = load_dataset(msd())
    assert [c.id for c in spec.cases] == ["case0", "case1"]
    assert spec.classes == {1: "tumour"} and spec.modality == "CT" and spec.preprocessing == "ct_abdomen"
    slices = SliceDataset(spec)
    assert len(slices) == 2 * 12  # Z = 12 (the NIfTI k axis)
    labelled = slices.indices([1])
    assert [slices.slices[i][:2] for i in labelled] == [("case0", 2), ("case0", 3), ("case1", 3), ("case1", 4)]
    item = slices[labelled[0]]
    assert item["image"].shape == (16, 8) and item["image"].dtype == np.float32
    assert item["label"].dtype == np.int64 and item["label"].sum() == 3 * 5
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["spacing"] == pytest.approx((0.9, 0.8)) and item["case"] == "case0" and item["slice"] == 2
    assert slices.areas[labelled[0]] == {1: 15}


def test_other_slicing_axes_move_that_axis_first(msd):
    spec = load_dataset(msd())
    sagittal = SliceDataset(spec, axis=2)  # the X axis: NIfTI i, 8 positions
    assert len(sagittal) == 2 * 8
    item = sagittal[sagittal.indices([1])[0]]
    assert item["image"].shape == (12, 16) and item["spacing"] == pytest.approx((2.5, 0.9))
    assert [sagittal.slices[i][1] for i in sagittal.indices([1], ["case0"])] == [2, 3, 4]


def test_nnunet_v2_layout_loads(tmp_path, nifti):
    root = tmp_path / "Dataset001_Test"
    for case in ("a", "b"):
        label = np.zeros((6, 6, 3), np.uint8)
        label[1:3, 1:3, 1] = 2
        nifti(root / "imagesTr" / f"{case}_0000.nii.gz", np.zeros((6, 6, 3), np.float32))
        nifti(root / "imagesTr" / f"{case}_0001.nii.gz", np.zeros((6, 6, 3), np.float32))  # a second channel
        nifti(root / "labelsTr" / f"{case}.nii.gz", label)
    meta = {
        "channel_names": {"0": "T2", "1": "ADC"},
        "labels": {"background": 0, "edema": 1, "core": 2},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    spec = load_dataset(root)
    assert [c.id for c in spec.cases] == ["a", "b"] and spec.classes == {1: "edema", 2: "core"}
    assert spec.cases[0].image.name == "a_0000.nii.gz" and spec.preprocessing == "mr"
    assert len(SliceDataset(spec).indices([2])) == 2
    meta["numTraining"] = 3
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="numTraining is 3, but labelsTr holds 2"):
        load_dataset(root)


def test_plain_2d_folders_binarise_0_255_masks(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "set" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "set" / "masks").mkdir(exist_ok=True)
        Image.fromarray(np.full((10, 12, 3), 200, np.uint8)).save(tmp_path / "set" / "images" / f"{name}.jpg")
        mask = np.zeros((10, 12), np.uint8)
        mask[2:6, 3:7] = 255
        Image.fromarray(mask).save(tmp_path / "set" / "masks" / f"{name}_segmentation.png")
    spec = load_dataset(tmp_path / "set")
    assert spec.classes == {1: "foreground"} and spec.preprocessing == "rgb" and spec.binarize
    slices = SliceDataset(spec)
    item = slices[0]
    assert item["image"].shape == (10, 12, 3) and item["image"].max() == pytest.approx(200 / 255)
    assert set(np.unique(item["label"])) == {0, 1} and item["label"].sum() == 16


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(spacing_mismatch=True), r"label spacing \(3\.0, 0\.9, 0\.8\) differs"),
        (dict(shape_mismatch=True), "label shape .* differs from image"),
        (dict(label_value=7), r"label values \[7\] are not classes"),
    ],
)
def test_bad_pairs_name_the_file_and_the_problem(msd, kwargs, message):
    spec = load_dataset(msd(**kwargs))
    with pytest.raises(DataError, match=rf"labelsTr/case0\.nii\.gz.*{message}"):
        SliceDataset(spec)


def test_spacing_within_tolerance_is_accepted(tmp_path, nifti):
    root = tmp_path / "d"
    nifti(root / "imagesTr" / "x.nii.gz", np.zeros((4, 4, 2), np.float32), zooms=(0.8, 0.9, 2.5))
    nifti(root / "labelsTr" / "x.nii.gz", np.zeros((4, 4, 2), np.uint8), zooms=(0.8000001, 0.9, 2.5000002))
    training = [{"image": "imagesTr/x.nii.gz", "label": "labelsTr/x.nii.gz"}]
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "a"}, "training": training}))
    assert len(SliceDataset(load_dataset(root))) == 2


def test_non_integer_labels_are_refused(tmp_path, nifti):
    root = tmp_path / "d"
    nifti(root / "imagesTr" / "x.nii.gz", np.zeros((4, 4, 2), np.float32))
    nifti(root / "labelsTr" / "x.nii.gz", np.full((4, 4, 2), 0.5, np.float32))
    training = [{"image": "imagesTr/x.nii.gz", "label": "labelsTr/x.nii.gz"}]
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "a"}, "training": training}))
    with pytest.raises(DataError, match=r"labelsTr/x\.nii\.gz: label holds non-integer values"):
        SliceDataset(load_dataset(root))


def test_missing_or_malformed_dataset_entries_are_named(msd, tmp_path):
    root = msd()
    (root / "labelsTr" / "case1.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"dataset\.json: lists labelsTr/case1\.nii\.gz, which does not exist"):
        load_dataset(root)
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset\.json: not valid JSON"):
        load_dataset(root)
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "bg"}, "training": []}))
    with pytest.raises(DataError, match="no labelled training cases"):
        load_dataset(root)
    with pytest.raises(FileNotFoundError, match="no dataset.json"):
        load_dataset(tmp_path)


def test_requested_classes_that_do_not_exist_are_an_error(msd):
    slices = SliceDataset(load_dataset(msd()))
    with pytest.raises(DataError, match=r"classes \[5\] are not in the dataset"):
        slices.indices([5])
    assert slices.indices([1], ["case0"], min_pixels=16) == []  # the lesion has 15 pixels per slice
    with pytest.raises(DataError, match="no slice of cases"):
        slices.indices([1], ["case0"], min_pixels=16, require=True)
    with pytest.raises(DataError, match="unknown cases"):
        SliceDataset(slices.spec, cases=["nope"])


def test_slice_index_is_cached_and_invalidated_by_a_changed_file(msd, monkeypatch, nifti):
    spec = load_dataset(msd())
    first = SliceDataset(spec)
    assert (spec.root / ".samadapt" / "index-axis0.json").exists()
    calls = []
    for name in ("read_volume", "read_label"):
        real = getattr(datasets_module, name)
        monkeypatch.setattr(datasets_module, name, lambda path, real=real: calls.append(path) or real(path))
    second = SliceDataset(load_dataset(spec.root))
    assert calls == [] and second.slices == first.slices and second.areas == first.areas
    nifti(spec.cases[0].label, np.zeros((8, 16, 12), np.uint8))  # a changed label file is re-indexed, alone
    third = SliceDataset(load_dataset(spec.root))
    assert [p.name for p in calls] == ["case0.nii.gz", "case0.nii.gz"]  # its image (validation) and its label
    assert third.indices([1], ["case0"]) == [] and third.indices([1], ["case1"]) == first.indices([1], ["case1"])


def test_read_only_dataset_keeps_its_index_in_the_cache_dir(msd, monkeypatch, tmp_path):
    root = msd()
    monkeypatch.setenv("SAMADAPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets_module.os, "access", lambda path, mode: False)
    SliceDataset(load_dataset(root))
    assert not (root / ".samadapt").exists()
    assert len(list((tmp_path / "cache" / "index").glob("*/index-axis0.json"))) == 1


def test_volumes_are_read_once_while_cached(msd, monkeypatch):
    slices = SliceDataset(load_dataset(msd()), cache_size=1, mmap_cache=False)
    calls = []
    real = datasets_module.read_volume
    monkeypatch.setattr(datasets_module, "read_volume", lambda path: calls.append(path.name) or real(path))
    for i in range(len(slices)):  # case0's slices, then case1's
        slices[i]
    slices[0]  # case0 again: evicted by case1 (cache of one)
    assert calls == ["case0.nii.gz", "case1.nii.gz", "case0.nii.gz"]


def test_splits_are_by_case_seeded_and_disjoint(msd):
    root = msd(cases=5)
    spec = load_dataset(root)
    split = split_dataset(spec, val=0.2, test=2, seed=3)
    assert len(split.train) == 2 and len(split.val) == 1 and len(split.test) == 2
    assert sorted(split.train + split.val + split.test) == [c.id for c in spec.cases]
    assert split == split_dataset(spec, val=0.2, test=2, seed=3)
    assert {tuple(split_dataset(spec, val=1, seed=s).val) for s in range(10)} != {tuple(split.val)}
    with pytest.raises(DataError, match="cannot hold out"):
        split_dataset(spec, val=3, test=2)
    train, val = split_cases(spec, 1, seed=0)
    assert len(train) == 4 and len(val) == 1 and not set(train) & set(val)


def test_index_command_summarises_the_dataset(msd, capsys, data_cli):
    root = msd()
    assert data_cli(["data", "index", str(root), "--cases"]) == 0
    out = capsys.readouterr().out
    assert "2 cases, 24 slices along axis 0" in out and "tumour" in out
    assert "case0" in out and "2 of   12 slices labelled" in out


def test_preprocessed_volumes_are_cached_on_disk_and_memory_mapped(msd, monkeypatch):
    root = msd()
    first = SliceDataset(load_dataset(root))
    items = [first[i] for i in range(len(first))]
    calls = []
    real = datasets_module.read_volume
    monkeypatch.setattr(datasets_module, "read_volume", lambda path: calls.append(path.name) or real(path))
    second = SliceDataset(load_dataset(root))
    again = [second[i] for i in range(len(second))]
    assert calls == []  # every volume came from the cache
    assert isinstance(second._volumes["case1"][0], np.memmap)
    for a, b in zip(items, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
        assert a["spacing"] == b["spacing"]
    # a changed image file is read again, never served stale from the cache
    image_path = root / "imagesTr" / "case0.nii.gz"
    os.utime(image_path, ns=(image_path.stat().st_atime_ns, image_path.stat().st_mtime_ns + 10**9))
    third = SliceDataset(load_dataset(root))
    third[0]
    assert calls == ["case0.nii.gz"]
    assert not list((root / ".samadapt" / "preprocessed").glob(".*.tmp"))


def test_a_dataset_sent_to_a_worker_process_leaves_its_open_volumes_behind(msd):
    import pickle

    slices = SliceDataset(load_dataset(msd()))
    slices[0]
    copy = pickle.loads(pickle.dumps(slices))
    assert len(slices._volumes) == 1 and len(copy._volumes) == 0
    np.testing.assert_array_equal(copy[0]["image"], slices[0]["image"])
