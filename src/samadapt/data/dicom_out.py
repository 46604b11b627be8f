"""DICOM out: label volumes as a DICOM Segmentation (highdicom) or an RT Structure Set, referencing the source series.

Both need the volume read from DICOM (``volume.dicom``, set by ``data.dicom``): they reference its study, series,
frame of reference and each slice's SOP instance, and take its frame geometry. Each class becomes one segment / ROI
named as the class, coded with SNOMED CT where the name is one of ``TERMS`` (laterality as a modifier), and the
samadapt version, run and adapter checksum identify the algorithm.

Formats: ``dicom-seg`` (``.dcm`` outputs by default) and ``rtstruct`` (``rtstruct.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from samadapt.data.dicom_terms import Algorithm, coded_terms
from samadapt.data.io import Volume
from samadapt.errors import ConfigError, DataError
from samadapt.files import atomic_write

DICOM_FORMATS = ("dicom-seg", "rtstruct")


def label_format(path: str | Path, format: str | None = None) -> str | None:
    """The DICOM format to write ``path`` in: ``format`` when given, ``rtstruct`` for names ending in
    ``rtstruct.dcm``, ``dicom-seg`` for other ``.dcm`` names, None (not DICOM: ``io.write_label``) otherwise.

    Raises:
        ConfigError: an unknown format, or a DICOM format for a name that does not end in .dcm.
    """
    name = Path(path).name.lower()
    if format in (None, "auto"):
        if not name.endswith(".dcm"):
            return None
        return "rtstruct" if re.search(r"rt[-_.]?struct\.dcm$", name) else "dicom-seg"
    if format not in DICOM_FORMATS:
        raise ConfigError(f"unknown label format {format!r}; choose one of {', '.join(DICOM_FORMATS)}")
    if not name.endswith(".dcm"):
        raise ConfigError(f"{path}: a {format} output is a DICOM file; name it *.dcm")
    return format


def write_dicom_labels(
    reference: Volume,
    labels: np.ndarray,
    path: str | Path,
    classes: dict[int, str],
    algorithm: Algorithm,
    format: str = "dicom-seg",
) -> Path:
    """Write labels on a DICOM volume's grid as ``format`` (``DICOM_FORMATS``), atomically.

    Raises:
        DataError: the volume was not read from a DICOM series, or the labels do not fit its grid.
    """
    path = Path(path)
    labels = np.asarray(labels)
    series = reference.dicom
    if series is None:
        raise DataError(
            f"{path}: a {format} output references its source DICOM series, and {reference.path} is not DICOM; "
            "write .nii.gz / .nrrd instead"
        )
    if labels.shape != reference.array.shape[:3] or labels.shape[0] != len(series.files):
        raise DataError(f"{path}: labels of shape {labels.shape} do not fit the series grid {reference.shape[:3]}")
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}: negative label values; class ids are >= 0")
    values = sorted({int(v) for v in np.unique(labels)} - {0} | set(classes))
    names = {v: classes.get(v) or f"class {v}" for v in values}
    if format == "rtstruct":
        from samadapt.data.rtstruct import rtstruct_dataset

        dataset = rtstruct_dataset(reference, labels, names, algorithm)
    elif format == "dicom-seg":
        dataset = seg_dataset(reference, labels, names, algorithm)
    else:
        raise ConfigError(f"unknown label format {format!r}; choose one of {', '.join(DICOM_FORMATS)}")
    return atomic_write(path, lambda tmp: dataset.save_as(tmp, enforce_file_format=True))


def seg_dataset(reference: Volume, labels: np.ndarray, names: dict[int, str], algorithm: Algorithm):
    """A highdicom ``Segmentation`` (BINARY, one segment per class, segment n = the n-th class in id order)."""
    import highdicom as hd

    series = reference.dicom
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm.version,
        parameters=algorithm.parameters(),
    )
    descriptions, lookup = [], np.zeros(max(names, default=0) + 1, np.uint16)
    for number, (value, name) in enumerate(sorted(names.items()), start=1):
        category, kind, side = coded_terms(name)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name[:64],
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=algorithm.generation,
            algorithm_identification=identification,
        )
        if side is not None:  # the modifier lives inside the property type's code item
            modifier = hd.sr.CodedConcept.from_code(side)
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
        descriptions.append(description)
        lookup[value] = number
    segments = lookup[np.minimum(labels, len(lookup) - 1)] * (labels < len(lookup))
    seg = hd.seg.Segmentation(
        source_images=series.datasets(),
        pixel_array=segments.astype(np.uint16 if len(names) > 255 else np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=1000 + (series.number or 0),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="samadapt",
        manufacturer_model_name=f"samadapt {algorithm.run}"[:64] if algorithm.run else "samadapt",
        software_versions=algorithm.version,
        device_serial_number=(algorithm.checksum or "0")[:16],
        content_label="SAMADAPT",
        content_description=algorithm.describe()[:64],
    )
    seg.SeriesDescription = f"samadapt {algorithm.run}"[:64]
    return seg


def read_seg(path: str | Path, reference: Volume) -> tuple[np.ndarray, dict[int, str]]:
    """A DICOM SEG's labels on ``reference``'s grid (segment numbers as values) and the segments' names.

    Raises:
        DataError: not a SEG, or it does not reference the reference's series.
    """
    import highdicom as hd

    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except Exception as error:  # pydicom / highdicom raise many kinds for a file that is not a SEG
        raise DataError(f"{path}: not a readable DICOM Segmentation ({type(error).__name__}: {error})") from error
    if reference.dicom is None:
        raise DataError(f"{path}: a SEG is read onto the DICOM series it references; {reference.path} is not DICOM")
    referenced = {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}
    if reference.dicom.series_uid not in referenced:
        raise DataError(f"{path}: references series {', '.join(sorted(referenced))}, not {reference.dicom.series_uid}")
    labels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(reference.dicom.sop_instance_uids),
        combine_segments=True,
        skip_overlap_checks=True,
    )
    names = {int(d.SegmentNumber): str(d.SegmentLabel) for d in seg.SegmentSequence}
    return np.asarray(labels), names


def is_dicom_object(path: str | Path, modality: str) -> bool:
    """Whether ``path`` is a DICOM file of ``modality`` (SEG, RTSTRUCT)."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except Exception:  # anything unreadable is not one
        return False
    return str(header.get("Modality", "")) == modality


def referenced_series(path: str | Path) -> set[str]:
    """The SeriesInstanceUIDs a SEG or an RTSTRUCT file draws on (empty for anything else)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # anything unreadable references nothing
        return set()
    if ds.get("Modality") == "SEG":
        return {str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", [])}
    found = set()
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []) if ds.get("Modality") == "RTSTRUCT" else []:
        for study in frame.get("RTReferencedStudySequence", []):
            found |= {str(s.SeriesInstanceUID) for s in study.get("RTReferencedSeriesSequence", [])}
    return found


def read_dicom_labels(path: str | Path, reference: Volume) -> tuple[np.ndarray, dict[int, str]]:
    """A SEG's or an RTSTRUCT's labels on ``reference``'s grid and their names (``read_seg``, ``read_rtstruct``)."""
    if is_dicom_object(path, "RTSTRUCT"):
        from samadapt.data.rtstruct import read_rtstruct

        return read_rtstruct(path, reference)
    return read_seg(path, reference)


def predictions_to_dicom(
    predictions: str | Path,
    dataset: str | Path,
    out: str | Path,
    format: str = "dicom-seg",
    algorithm: Algorithm | None = None,
) -> list[Path]:
    """Label files of cases converted by ``from-dicom`` (``predict -i DATASET/imagesTs``, or any ``CASE.nii.gz``)
    -> one DICOM SEG / RTSTRUCT per case on its source series, found through ``DATASET/dicom_mapping.json``;
    classes named by ``DATASET/dataset.json``. Returns the files written (``OUT/CASE.dcm``).

    Raises:
        InputNotFoundError: no mapping, or a series that is gone. DataError: a case not in the mapping, or labels
            on another grid than their series.
    """
    import json

    from samadapt.data.dicom import read_series
    from samadapt.data.io import NIFTI, read_label, suffix_of
    from samadapt.errors import InputNotFoundError

    dataset, out = Path(dataset), Path(out)
    mapping_path = dataset / "dicom_mapping.json"
    if not mapping_path.is_file():
        raise InputNotFoundError(f"{mapping_path}: no such file (a dataset written by samadapt data from-dicom has it)")
    mapping = json.loads(mapping_path.read_text())
    labels_of = json.loads((dataset / "dataset.json").read_text())["labels"]  # MSD, as from-dicom writes it
    classes = {int(k): str(v) for k, v in labels_of.items() if int(k) != 0}
    files = sorted(p for p in Path(predictions).iterdir() if suffix_of(p) in NIFTI)
    if not files:
        raise InputNotFoundError(f"{predictions}: no NIfTI label files")
    written = []
    for path in files:
        case = path.name[: -len(suffix_of(path))].removesuffix("_0000")
        if case not in mapping:
            raise DataError(f"{path}: case {case} is not in {mapping_path}")
        entry = mapping[case]
        volume = read_series(entry["folder"], entry["series_instance_uid"])
        labels = read_label(path)
        if labels.array.shape != volume.array.shape[:3] or not np.allclose(labels.affine, volume.affine, atol=1e-3):
            raise DataError(f"{path}: labels on another grid than series {entry['series_instance_uid']}")
        target = out / f"{case}.dcm"
        written.append(write_dicom_labels(volume, labels.array, target, classes, algorithm or Algorithm(), format))
    return written
