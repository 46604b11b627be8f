"""Reading and writing volumes in every format, and the errors bad files get."""

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from samadapt.data import read_label, read_volume, write_label
from samadapt.errors import DataError


def test_nifti_round_trip_keeps_array_spacing_affine_and_header(tmp_path, nifti):
    rng = np.random.default_rng(0)
    affine = np.array([[-0.8, 0, 0, 90], [0, 0.9, 0.1, -120], [0, 0, 2.5, -60], [0, 0, 0, 1]])
    src = nifti(tmp_path / "ct.nii.gz", rng.normal(size=(20, 24, 6)).astype(np.float32), affine=affine)
    volume = read_volume(src)
    assert volume.array.shape == (6, 24, 20)  # (Z, Y, X)
    np.testing.assert_allclose(volume.spacing, (2.5, 0.9, 0.8), rtol=1e-6)
    labels = (volume.array > 0).astype(np.uint8)
    back = read_volume(write_label(volume, labels, tmp_path / "pred.nii.gz"))
    np.testing.assert_array_equal(back.array, labels)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_allclose(back.spacing, volume.spacing, rtol=1e-6)
    assert back.array.dtype == np.uint8 and back.header.get_slope_inter()[0] in (None, 1.0)


def test_nifti_label_is_not_rescaled_by_the_image_scaling(tmp_path):
    image = nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4))
    image.header.set_slope_inter(2.0, -1024.0)  # a CT stored with rescale slope / intercept
    nib.save(image, str(tmp_path / "ct.nii.gz"))
    volume = read_volume(tmp_path / "ct.nii.gz")
    labels = np.zeros((2, 4, 4), np.uint8)
    labels[1, 2, 3] = 3
    back = read_volume(write_label(volume, labels, tmp_path / "pred.nii.gz"))
    np.testing.assert_array_equal(back.array, labels)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_round_trip_keeps_array_spacing_origin_and_direction(tmp_path, suffix):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 3.0))
    image.SetOrigin((12.0, -4.0, 30.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(tmp_path / f"a{suffix}"))
    volume = read_volume(tmp_path / f"a{suffix}")
    np.testing.assert_array_equal(volume.array, array)
    assert volume.spacing == pytest.approx((3.0, 0.8, 0.7))
    assert volume.origin == pytest.approx(image.GetOrigin())
    np.testing.assert_allclose(volume.direction.ravel(), image.GetDirection(), atol=1e-9)
    labels = (array % 3).astype(np.uint8)
    back_itk = sitk.ReadImage(str(write_label(volume, labels, tmp_path / f"b{suffix}")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back_itk), labels)
    assert back_itk.GetSpacing() == pytest.approx(image.GetSpacing())
    assert back_itk.GetOrigin() == pytest.approx(image.GetOrigin())
    assert back_itk.GetDirection() == pytest.approx(image.GetDirection())
    # across formats: a NIfTI written from an ITK reference lands on the same world grid, and is the same in ITK
    nii = write_label(volume, labels, tmp_path / "c.nii.gz")
    np.testing.assert_allclose(read_volume(nii).affine, volume.affine, atol=1e-5)
    via_itk = sitk.ReadImage(str(nii))
    assert via_itk.GetOrigin() == pytest.approx(image.GetOrigin(), abs=1e-4)
    assert via_itk.GetDirection() == pytest.approx(image.GetDirection(), abs=1e-6)


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
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT image storage
            "0008|0018": f"1.2.3.4.5.{z + 1}",
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
    assert volume.origin == pytest.approx((0.0, 0.0, 0.0))
    single = read_volume(folder / "001.dcm")  # one file alone is a 2D slice
    assert single.array.shape == (1, 8, 10)


def test_pictures_are_volumes_of_depth_one_and_labels_go_back_to_png(tmp_path):
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(tmp_path / "rgb.png")
    rgb = read_volume(tmp_path / "rgb.png")
    assert rgb.array.shape == (1, 12, 20, 3) and rgb.is_2d
    grey = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    Image.fromarray(grey).save(tmp_path / "grey.jpg", quality=100)
    assert read_volume(tmp_path / "grey.jpg").array.shape == (1, 12, 20)
    labels = np.zeros((1, 12, 20), np.uint8)
    labels[0, 3:5, 4:9] = 2
    back = read_volume(write_label(rgb, labels, tmp_path / "mask.png"))
    np.testing.assert_array_equal(back.array, labels)
    # a mask saved as grey RGB reads as one channel
    Image.fromarray(np.repeat(labels[0, :, :, None], 3, axis=2)).save(tmp_path / "rgbmask.png")
    np.testing.assert_array_equal(read_label(tmp_path / "rgbmask.png").array, labels)


def test_npz_as_medsam_stores_it(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, size=(5, 6, 7)).astype(np.uint8)
    gts = (imgs > 128).astype(np.uint8)
    # MedSAM writes spacing=img_sitk.GetSpacing(): (x, y, z)
    np.savez_compressed(tmp_path / "ct.npz", imgs=imgs, gts=gts, spacing=np.array([0.7, 0.8, 3.0]))
    image, label = read_volume(tmp_path / "ct.npz"), read_label(tmp_path / "ct.npz")
    np.testing.assert_array_equal(image.array, imgs)
    np.testing.assert_array_equal(label.array, gts)
    assert image.spacing == pytest.approx((3.0, 0.8, 0.7)) and label.spacing == image.spacing
    rgb = np.zeros((6, 7, 3), np.uint8)
    np.savez(tmp_path / "photo.npz", imgs=rgb, gts=np.zeros((6, 7), np.uint8))
    assert read_volume(tmp_path / "photo.npz").array.shape == (1, 6, 7, 3)
    np.savez(tmp_path / "none.npz", other=rgb)
    with pytest.raises(DataError, match=r"none\.npz.*'imgs'"):
        read_volume(tmp_path / "none.npz")


def truncated_nifti(path):
    nib.save(nib.Nifti1Image(np.ones((30, 30, 30), np.float32), np.eye(4)), str(path.with_name("ok.nii.gz")))
    raw = gzip.decompress(path.with_name("ok.nii.gz").read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 3]))


@pytest.mark.parametrize(
    "name,content",
    [
        ("truncated.nii.gz", truncated_nifti),
        ("garbage.nii.gz", b"\x1f\x8b\x08this is no gzip stream"),
        ("garbage.nii", b"\x00" * 10),
        ("garbage.nrrd", b"\x00\x01not an nrrd at all"),
        ("garbage.png", b"\x89PNG\r\n\x1a\n broken"),
        ("garbage.npz", b"PK\x03\x04 broken zip"),
        ("weird.xyz", b"data"),
    ],
)
def test_corrupt_or_unknown_files_name_the_file(tmp_path, name, content):
    path = tmp_path / name
    if callable(content):
        content(path)
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        read_volume(path)


def test_missing_file_and_bad_writes_are_named(tmp_path, nifti):
    with pytest.raises(FileNotFoundError, match="nothere.nii.gz"):
        read_volume(tmp_path / "nothere.nii.gz")
    volume = read_volume(nifti(tmp_path / "a.nii.gz", np.zeros((4, 5, 2), np.float32)))
    with pytest.raises(DataError, match=r"pred\.nii\.gz.*\(3, 5, 4\).*\(2, 5, 4\)"):
        write_label(volume, np.zeros((3, 5, 4), np.uint8), tmp_path / "pred.nii.gz")
    with pytest.raises(DataError, match=r"pred\.png.*one slice"):
        write_label(volume, np.zeros((2, 5, 4), np.uint8), tmp_path / "pred.png")
    with pytest.raises(DataError, match=r"pred\.jpg"):
        write_label(volume, np.zeros((2, 5, 4), np.uint8), tmp_path / "pred.jpg")
    with pytest.raises(DataError, match="negative"):
        write_label(volume, -np.ones((2, 5, 4), np.int16), tmp_path / "pred.nrrd")
