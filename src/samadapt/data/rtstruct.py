"""RT Structure Sets: label volumes as contours (one ROI per class) on their DICOM series, and back.

The contours run along pixel edges (``contours.mask_to_polygons``), one closed planar polygon per outer boundary and
one per hole, on the plane of the slice's centre; read back by the even-odd rule at pixel centres they give the
same labels (planning systems treat a contour inside another of the same ROI as a hole in the same way). Written with
pydicom: highdicom has no RTSTRUCT writer, and rt-utils needs OpenCV.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from samadapt.data.contours import mask_to_polygons, polygons_to_mask
from samadapt.data.dicom_terms import ANATOMY, Algorithm, coded_terms
from samadapt.data.io import _LPS_TO_RAS, Volume
from samadapt.errors import DataError

STUDY_COMPONENT_CLASS = "1.2.840.10008.3.1.2.3.1"  # what RTReferencedStudySequence names the study by
_COPIED = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime")
_TYPE2 += ("ReferringPhysicianName", "StudyID", "AccessionNumber")
_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)]
_COLOURS += [(70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def _code_item(code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
    return item


def _world(reference: Volume, points_xyz: np.ndarray) -> np.ndarray:
    """Voxel (x, y, z) points -> LPS millimetres (DICOM patient coordinates)."""
    ras = points_xyz @ reference.affine[:3, :3].T + reference.affine[:3, 3]
    return ras @ _LPS_TO_RAS.T


def rtstruct_dataset(reference: Volume, labels: np.ndarray, names: dict[int, str], algorithm: Algorithm) -> Dataset:
    """An RT Structure Set of ``labels`` (one ROI per entry of ``names``, in id order) on ``reference``'s series."""
    series = reference.dicom
    sources = series.datasets()
    now = datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in _COPIED:
        if keyword in sources[0]:
            setattr(ds, keyword, sources[0].data_element(keyword).value)
        elif keyword in _TYPE2:
            setattr(ds, keyword, "")
    ds.SOPClassUID, ds.SOPInstanceUID = RTStructureSetStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.Modality, ds.SeriesInstanceUID = "RTSTRUCT", generate_uid()
    ds.SeriesNumber, ds.InstanceNumber = 2000 + (series.number or 0), 1
    ds.SeriesDescription = f"samadapt {algorithm.run}"[:64]
    ds.OperatorsName = ""
    ds.Manufacturer, ds.SoftwareVersions = "samadapt", algorithm.version
    ds.ManufacturerModelName = f"samadapt {algorithm.run}"[:64] if algorithm.run else "samadapt"
    ds.StructureSetLabel, ds.StructureSetName = "SAMADAPT", algorithm.name
    ds.StructureSetDescription = algorithm.describe()
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.ApprovalStatus = "UNAPPROVED"
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = sources[0].get("PositionReferenceIndicator", "")

    slices = [_image_item(source) for source in sources]
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = series.series_uid
    referenced_series.ContourImageSequence = slices
    study = Dataset()
    study.ReferencedSOPClassUID, study.ReferencedSOPInstanceUID = STUDY_COMPONENT_CLASS, series.study_uid
    study.RTReferencedSeriesSequence = [referenced_series]
    frame = Dataset()
    frame.FrameOfReferenceUID = series.frame_of_reference_uid
    frame.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame]

    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    for number, (value, name) in enumerate(sorted(names.items()), start=1):
        category, kind, _ = coded_terms(name)
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = number, series.frame_of_reference_uid, name
        roi.ROIGenerationAlgorithm = algorithm.generation
        roi.ROIGenerationDescription = algorithm.describe()[:64]
        ds.StructureSetROISequence.append(roi)
        contour = Dataset()
        contour.ReferencedROINumber = number
        contour.ROIDisplayColor = list(_COLOURS[(number - 1) % len(_COLOURS)])
        contours = _contours(reference, labels == value, slices)
        if contours:  # an empty class keeps its ROI, without contours (an empty sequence is not allowed)
            contour.ContourSequence = contours
        ds.ROIContourSequence.append(contour)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType = "ORGAN" if category == ANATOMY else ""
        observation.ROIInterpreter = ""
        observation.RTROIIdentificationCodeSequence = [_code_item(kind)]  # the side stays in the ROI's name
        ds.RTROIObservationsSequence.append(observation)
    return ds


def _image_item(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    return item


def _contours(reference: Volume, mask: np.ndarray, slices: list[Dataset]) -> list[Dataset]:
    found = []
    for z in np.nonzero(mask.reshape(len(mask), -1).any(axis=1))[0]:
        for polygon in mask_to_polygons(mask[z]):
            points = np.column_stack([polygon, np.full(len(polygon), float(z))])
            item = Dataset()
            item.ContourImageSequence = [slices[z]]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item.ContourNumber = len(found) + 1
            item.ContourData = [f"{v:.4f}" for v in _world(reference, points).ravel()]
            found.append(item)
    return found


def read_rtstruct(path: str | Path, reference: Volume) -> tuple[np.ndarray, dict[int, str]]:
    """An RT Structure Set's ROIs rasterised on ``reference``'s grid (ROI n of the file -> value n, later ROIs drawn
    over earlier ones) and their names.

    Raises:
        DataError: not an RTSTRUCT, another frame of reference, or a contour off the slice planes.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as error:  # pydicom raises many kinds for a file that is not DICOM
        raise DataError(f"{path}: not a readable DICOM file ({type(error).__name__}: {error})") from error
    if ds.get("Modality") != "RTSTRUCT":
        raise DataError(f"{path}: not an RT Structure Set (Modality {ds.get('Modality')!r})")
    if reference.dicom is not None:
        frames = {str(f.FrameOfReferenceUID) for f in ds.get("ReferencedFrameOfReferenceSequence", [])}
        if frames and reference.dicom.frame_of_reference_uid not in frames:
            raise DataError(
                f"{path}: contours in frame of reference {', '.join(sorted(frames))}, the series is in "
                f"{reference.dicom.frame_of_reference_uid}"
            )
    to_voxel = np.linalg.inv(reference.affine)
    shape = reference.array.shape[:3]
    order = {int(roi.ROINumber): (k + 1, str(roi.ROIName)) for k, roi in enumerate(ds.StructureSetROISequence)}
    labels = np.zeros(shape, np.uint16)
    for contour_set in ds.get("ROIContourSequence", []):
        value, _ = order[int(contour_set.ReferencedROINumber)]
        planes: dict[int, list[np.ndarray]] = {}
        for contour in contour_set.get("ContourSequence", []):
            lps = np.asarray(contour.ContourData, float).reshape(-1, 3)
            voxels = (lps @ _LPS_TO_RAS.T) @ to_voxel[:3, :3].T + to_voxel[:3, 3]
            z = np.round(voxels[:, 2])
            if np.abs(voxels[:, 2] - z).max() > 0.05 or not (0 <= z[0] < shape[0]) or np.ptp(z) > 0:
                raise DataError(f"{path}: ROI {value} has a contour off the slice planes of the series")
            planes.setdefault(int(z[0]), []).append(voxels[:, :2])
        for z, polygons in planes.items():
            labels[z][polygons_to_mask(polygons, shape[1:])] = value
    return labels, {value: name for value, name in order.values()}
