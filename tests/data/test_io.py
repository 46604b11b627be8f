"""Reading and writing volumes, dataset layouts, the slice index, and the errors bad input gets."""

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from samadapt.data import DataError, SliceDataset, load_dataset, read_volume, write_label
from samadapt.data import datasets as datasets_module
from samadapt.data.preprocess import ct_window, normalize, percentile_clip


def nifti(path, array_xyz, zooms=(0.8, 0.9, 2.5), affine=None):
    if affine is None:
        affine = np.diag([*zooms, 1.0])
        affine[:3, 3] = [10.0, -20.0, 5.0]
    image = nib.Nifti1Image(array_xyz, affine)
    image.header.set_zooms(zooms)
    nib.save(image, str(path))
    return path


def test_nifti_round_trip_keeps_array_spacing_and_affine(tmp_path):
    rng = np.random.default_rng(0)
    affine = np.array([[-0.8, 0, 0, 90], [0, 0.9, 0.1, -120], [0, 0, 2.5, -60], [0, 0, 0, 1]])
    src = nifti(tmp_path / "ct.nii.gz", rng.normal(size=(20, 24, 6)).astype(np.float32), affine=affine)
    volume = read_volume(src)
    assert volume.array.shape == (6, 24, 20)  # (Z, Y, X)
    np.testing.assert_allclose(volume.spacing, (2.5, 0.9, 0.8), rtol=1e-6)
    labels = (volume.array > 0).astype(np.uint8)
    out = write_label(volume, labels, tmp_path / "pred.nii.gz")
    back = read_volume(out)
    np.testing.assert_array_equal(back.array, labels)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_allclose(back.spacing, volume.spacing, rtol=1e-6)


def test_nrrd_round_trip_keeps_array_spacing_origin_and_direction(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 3.0))
    image.SetOrigin((12.0, -4.0, 30.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(tmp_path / "a.nrrd"))
    volume = read_volume(tmp_path / "a.nrrd")
    np.testing.assert_array_equal(volume.array, array)
    assert volume.spacing == pytest.approx((3.0, 0.8, 0.7))
    labels = (array % 3).astype(np.uint8)
    back_itk = sitk.ReadImage(str(write_label(volume, labels, tmp_path / "b.nrrd")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back_itk), labels)
    assert back_itk.GetSpacing() == pytest.approx(image.GetSpacing())
    assert back_itk.GetOrigin() == pytest.approx(image.GetOrigin())
    assert back_itk.GetDirection() == pytest.approx(image.GetDirection())
    # and across formats: the NIfTI written from an NRRD reference lands on the same world grid
    nii = read_volume(write_label(volume, labels, tmp_path / "c.nii.gz"))
    np.testing.assert_allclose(nii.affine, volume.affine, atol=1e-5)


def test_dicom_series_written_with_simpleitk_reads_back(tmp_path):
    array = (np.arange(3 * 8 * 10).reshape(3, 8, 10) % 200).astype(np.int16)
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(3):
        plane = sitk.GetImageFromArray(array[z])
        plane.SetSpacing((0.5, 0.6))
        for tag, value in {
            "0020|000d": "1.2.3",
            "0020|000e": "1.2.3.4",
            "0020|0032": f"0\\0\\{z * 2.0}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(z + 1),
            "0008|0060": "CT",
            "0028|0030": "0.6\\0.5",
            "0018|0050": "2.0",
        }.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{z:03d}.dcm"))
        writer.Execute(plane)
    volume = read_volume(folder)
    np.testing.assert_array_equal(volume.array, array)
    assert volume.spacing == pytest.approx((2.0, 0.6, 0.5))


def test_png_is_a_volume_of_depth_one(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(tmp_path / "x.png")
    volume = read_volume(tmp_path / "x.png")
    assert volume.array.shape == (1, 12, 20, 3) and volume.is_2d


@pytest.mark.parametrize(
    "name,content",
    [("broken.nii.gz", None), ("garbage.nrrd", b"\x00\x01not an nrrd at all"), ("weird.xyz", b"data")],
)
def test_corrupt_or_unknown_files_name_the_file(tmp_path, name, content):
    path = tmp_path / name
    if content is None:  # a truncated NIfTI
        nifti(tmp_path / "ok.nii.gz", np.ones((30, 30, 30), np.float32))
        raw = gzip.decompress((tmp_path / "ok.nii.gz").read_bytes())
        path.write_bytes(gzip.compress(raw[: len(raw) // 3]))
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match=name):
        read_volume(path).array.sum()


def make_msd(root, cases=2, shape=(8, 16, 12), label_value=1, spacing_mismatch=False, shape_mismatch=False):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    rng = np.random.default_rng(0)
    for i in range(cases):
        image = rng.normal(size=shape).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        label[2:5, 3:8, 2 + i : 4 + i] = label_value
        nifti(root / "imagesTr" / f"case{i}.nii.gz", image)
        label_shape_ok = label if not shape_mismatch else label[:-1]
        nifti(
            root / "labelsTr" / f"case{i}.nii.gz",
            label_shape_ok,
            zooms=(0.8, 0.9, 3.0) if spacing_mismatch else (0.8, 0.9, 2.5),
        )
        training.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    meta = {"labels": {"0": "background", "1": "tumour"}, "modality": {"0": "CT"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_msd_layout_loads_and_slices(tmp_path):
    spec = load_dataset(make_msd(tmp_path / "msd"))
    assert [c.id for c in spec.cases] == ["case0", "case1"]
    assert spec.classes == {1: "tumour"} and spec.preprocessing == "ct_abdomen"
    slices = SliceDataset(spec)
    assert len(slices) == 2 * 12  # Z = 12 (NIfTI k axis)
    item = slices[slices.indices([1])[0]]
    assert item["image"].shape == (16, 8) and item["label"].max() == 1
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["spacing"] == pytest.approx((0.9, 0.8))


def test_nnunet_v2_layout_loads(tmp_path):
    root = tmp_path / "Dataset001_Test"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in ("a", "b"):
        nifti(root / "imagesTr" / f"{case}_0000.nii.gz", np.zeros((6, 6, 3), np.float32))
        nifti(root / "labelsTr" / f"{case}.nii.gz", np.zeros((6, 6, 3), np.uint8))
    meta = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "edema": 1, "core": 2}, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    spec = load_dataset(root)
    assert [c.id for c in spec.cases] == ["a", "b"] and spec.classes == {1: "edema", 2: "core"}
    assert spec.preprocessing == "mr"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(spacing_mismatch=True), "spacing"),
        (dict(shape_mismatch=True), "shape"),
        (dict(label_value=7), r"label values \[7\]"),
    ],
)
def test_bad_pairs_name_the_file_and_the_problem(tmp_path, kwargs, message):
    spec = load_dataset(make_msd(tmp_path / "bad", **kwargs))
    with pytest.raises(DataError, match=rf"case0\.nii\.gz.*{message}"):
        SliceDataset(spec)


def test_missing_dataset_json_entry_is_named(tmp_path):
    root = make_msd(tmp_path / "missing")
    (root / "labelsTr" / "case1.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"dataset.json: lists labelsTr/case1.nii.gz"):
        load_dataset(root)


def test_slice_index_is_cached(tmp_path, monkeypatch):
    spec = load_dataset(make_msd(tmp_path / "cache"))
    first = SliceDataset(spec)
    calls = []
    real = datasets_module.read_volume
    monkeypatch.setattr(datasets_module, "read_volume", lambda path: calls.append(path) or real(path))
    second = SliceDataset(load_dataset(spec.root))
    assert calls == [] and second.slices == first.slices
    nifti(spec.cases[0].label, np.zeros((8, 16, 12), np.uint8))  # a changed label file is re-indexed
    third = SliceDataset(load_dataset(spec.root))
    assert len(calls) == 2 and not any(third.slices[i][2] for i in range(12))


def test_presets_on_hand_computed_values():
    hu = np.array([-1000.0, -125.0, 75.0, 275.0, 1000.0])
    np.testing.assert_allclose(normalize(hu, "ct_synapse"), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(ct_window(hu, level=40, width=400), np.clip((hu + 160) / 400, 0, 1))
    assert normalize(np.full((4, 4), 7.0), "mr").max() == 0  # constant image: zeros, no division by zero
    values = np.arange(1001, dtype=float)
    clipped = percentile_clip(values)
    assert clipped[0] == 0 and clipped[-1] == 1 and clipped[500] == pytest.approx(0.5)
