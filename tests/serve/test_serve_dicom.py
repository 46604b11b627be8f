"""The app on DICOM: a folder of two series lists both, each opens on its own, and saves as NIfTI, SEG or RTSTRUCT."""

import numpy as np
import pydicom

from samadapt.data.dicom_out import read_seg
from samadapt.data.io import read_volume
from samadapt.data.rtstruct import read_rtstruct
from tests.data.dicom_series import ct_case, mr_case, write_series


def test_a_dicom_folder_lists_each_series_and_saves_seg_and_rtstruct(workspace, root):
    ct, ct_label = ct_case()
    mr, _ = mr_case()
    ct_uid, _ = write_series(ct, root / "export", "CT", series_number=2)  # two series in one folder
    write_series(mr, root / "export", "MR", series_number=4)
    write_series(mr, root / "other" / "mr", "MR", series_number=1)  # a folder of one series is one case
    listed = [c for c in workspace.cases() if "(DICOM" in c["name"]]
    assert [c["name"] for c in listed] == [
        "root/export/ (DICOM CT #2 CT crop)",
        "root/export/ (DICOM MR #4 MR crop)",
        "root/other/mr/ (DICOM)",
    ]
    session = workspace.open(listed[0]["path"])
    assert session.volume.dicom.series_uid == ct_uid and session.summary()["dicom"] is True
    assert session.summary()["name"] == "export_s2"  # the folder and the series number, not the UID
    assert workspace.open(listed[1]["path"]).volume.dicom.modality == "MR"
    assert workspace.open(listed[0]["path"]) is session  # the same series reopens its session
    session.labels[...] = ct_label.array
    session.objects = {1: {"name": "aorta", "color": "#000"}, 5: {"name": "liver", "color": "#fff"}}
    session.labels[~np.isin(session.labels, [1, 5])] = 0
    seg = workspace.save(session, "ct.seg.dcm")
    rt = workspace.save(session, "ct_rtstruct.dcm")
    nifti = workspace.save(session, "ct.nii.gz")
    assert pydicom.dcmread(seg).SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    labels, names = read_seg(seg, session.volume)
    assert names == {1: "aorta", 2: "liver"}  # segments are numbered in class order
    np.testing.assert_array_equal(labels, np.select([session.labels == 1, session.labels == 5], [1, 2], 0))
    labels, names = read_rtstruct(rt, session.volume)
    assert names == {1: "aorta", 2: "liver"}
    np.testing.assert_array_equal(labels, np.select([session.labels == 1, session.labels == 5], [1, 2], 0))
    np.testing.assert_array_equal(read_volume(nifti).array, session.labels)
