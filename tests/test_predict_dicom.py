"""``samadapt predict`` on a DICOM folder: --series picks a series, --out *.dcm / --format write SEG and RTSTRUCT."""

import json

import numpy as np
import pydicom
import pytest

from samadapt.cli import main
from samadapt.data.dicom_out import read_seg
from samadapt.data.io import read_volume
from samadapt.data.rtstruct import read_rtstruct
from samadapt.models.registry import default_weights_path
from samadapt.runs import weights_sha256
from tests.data.dicom_series import ct_case, mr_case, write_series


@pytest.mark.slow
def test_predict_writes_nifti_seg_and_rtstruct_with_the_same_labels(tmp_path, capsys):
    ct, _ = ct_case()
    mr, _ = mr_case()
    folder = tmp_path / "export"
    ct_uid, _ = write_series(ct, folder, "CT", series_number=2)
    mr_uid, _ = write_series(mr, folder, "MR", series_number=3)
    argv = ["predict", str(folder), "--run", "lite_medsam", "--boxes", "[[20, 14, 2, 56, 50, 3]]"]
    assert main([*argv, "--out", str(tmp_path / "r.nii.gz")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "holds 2 DICOM image series; pick one with --series UID" in error[0]
    assert ct_uid in error[0] and mr_uid in error[0]
    argv += ["--series", ct_uid]
    assert main([*argv, "--out", str(tmp_path / "r.nii.gz")]) == 0
    labels = read_volume(tmp_path / "r.nii.gz").array
    assert labels.sum() > 0
    record = json.loads((tmp_path / "r.dicom.json").read_text())
    assert record["series_instance_uid"] == ct_uid and record["labels"] == "r.nii.gz"
    assert record["image_orientation_patient"] == [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]  # the crop's own (NIfTI RAS +)
    assert main([*argv, "--out", str(tmp_path / "r.dcm")]) == 0
    assert main([*argv, "--format", "rtstruct", "--out", str(tmp_path / "contours.dcm")]) == 0
    volume = read_volume(folder, series=ct_uid)
    seg_labels, names = read_seg(tmp_path / "r.dcm", volume)
    np.testing.assert_array_equal(seg_labels, labels)
    rt_labels, rt_names = read_rtstruct(tmp_path / "contours.dcm", volume)
    np.testing.assert_array_equal(rt_labels, labels)
    assert names == rt_names == {1: "object 1"}
    algorithm = pydicom.dcmread(tmp_path / "r.dcm").SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    checksum = weights_sha256(default_weights_path("lite_medsam"))
    assert "run=lite_medsam" in algorithm.AlgorithmParameters
    assert f"model_sha256={checksum}" in algorithm.AlgorithmParameters
    assert main([*argv, "--format", "rtstruct", "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert "a rtstruct output is a DICOM file; name it *.dcm" in capsys.readouterr().err
    nifti = read_volume(tmp_path / "r.nii.gz").path
    assert main(["predict", str(nifti), "--run", "lite_medsam", "--out", str(tmp_path / "n.dcm")]) == 2
    assert "a dicom-seg output references a DICOM series; " in capsys.readouterr().err
