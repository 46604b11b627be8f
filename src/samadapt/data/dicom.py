"""DICOM series in: find the series of a folder, pick one, and refuse geometry that one voxel grid cannot hold.

A PACS export often holds several series (and SEG / RTSTRUCT objects) under one folder. ``list_series`` groups the
files by SeriesInstanceUID from their headers alone; ``read_series`` reads the one asked for (or the only image
series) after checking that its slices share one orientation, are stacked along the slice normal (no gantry tilt),
evenly spaced and never at the same position. SimpleITK reads the pixels (rescale slope / intercept applied) from
the files in the order sorted here; the series' identity (UIDs, patient orientation, the sorted files) stays with
the ``Volume`` as ``volume.dicom``, so that outputs (a DICOM SEG, an RT Structure Set, ``from-dicom``'s mapping) can
reference it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from samadapt.data.volume import Volume, from_itk, suffix_of
from samadapt.errors import DataError, InputNotFoundError
from samadapt.files import atomic_write_text

# headers read to group and check files; pixel data is left to SimpleITK
_TAGS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "PatientID",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "GantryDetectorTilt",
    "NumberOfFrames",
    "Rows",
    "Columns",
)
ORIENTATION_TOLERANCE = 1e-4  # direction cosines
# positions are often stored to 0.01 mm: a grid may be off by that much without being sheared or gapped
POSITION_TOLERANCE_MM = 0.05
SPACING_TOLERANCE = 0.01  # relative spread of the gaps between slices (beyond POSITION_TOLERANCE_MM)


@dataclass(frozen=True)
class DicomSeries:
    """One series of a folder, as its headers describe it.

    Attributes:
        folder: the folder it was found under.
        series_uid, study_uid, frame_of_reference_uid: the UIDs an output references.
        modality: CT, MR, SEG, RTSTRUCT, ...
        orientation: ImageOrientationPatient (row then column direction cosines, LPS) of an image series.
        files: the files; for an image series sorted along the slice normal (the volume's Z order).
        sop_instance_uids: the files' SOP instance UIDs, in the same order.
        image: whether it is a series of single-frame images with a geometry (one that samadapt reads as a volume).
    """

    folder: Path
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    modality: str
    description: str
    number: int | None
    patient_id: str
    orientation: tuple[float, ...]
    files: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    image: bool

    def describe(self) -> str:
        """One line for listings: UID, modality, file count, number and description."""
        number = f" #{self.number}" if self.number is not None else ""
        kind = "" if self.image else " (not an image series)"
        return f"{self.series_uid} ({self.modality or '?'}, {len(self.files)} files{number} {self.description}{kind})"

    def record(self) -> dict:
        """What outputs keep to refer back to the series (JSON-ready)."""
        return {
            "series_instance_uid": self.series_uid,
            "study_instance_uid": self.study_uid,
            "frame_of_reference_uid": self.frame_of_reference_uid,
            "modality": self.modality,
            "patient_id": self.patient_id,
            "image_orientation_patient": list(self.orientation),
            "folder": str(self.folder),
            "slices": len(self.files),
        }

    def datasets(self, pixels: bool = False) -> list[pydicom.Dataset]:
        """The files' datasets in the volume's Z order (headers only unless ``pixels``)."""
        return [pydicom.dcmread(path, stop_before_pixels=not pixels) for path in self.files]


def _header(path: Path) -> pydicom.Dataset | None:
    """The header of a DICOM file, None for anything else (a README, a DICOMDIR, a NIfTI beside the series)."""
    if path.name.upper() == "DICOMDIR" or path.name.startswith("."):
        return None
    for force in (False, True):  # some exports omit the 128-byte preamble: retried when the name says DICOM
        if force and path.suffix.lower() not in ("", ".dcm", ".ima", ".dicom"):
            return None
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, force=force, specific_tags=list(_TAGS))
        except InvalidDicomError:
            continue
        except Exception:  # a truncated or foreign file read with force: not part of a series
            return None
        return header if "SeriesInstanceUID" in header else None
    return None


def _is_image(header: pydicom.Dataset) -> bool:
    frames = int(header.get("NumberOfFrames", 1) or 1)
    return frames == 1 and all(k in header for k in ("ImageOrientationPatient", "ImagePositionPatient", "Rows"))


def _scan(folder: Path) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    if not folder.is_dir():
        raise InputNotFoundError(f"{folder}: no such folder")
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            header = _header(Path(here) / name)
            if header is not None:
                groups.setdefault(str(header.SeriesInstanceUID), []).append((Path(here) / name, header))
    return groups


def _series(folder: Path, uid: str, members: list[tuple[Path, pydicom.Dataset]]) -> DicomSeries:
    first = members[0][1]
    image = all(_is_image(h) for _, h in members)
    number = first.get("SeriesNumber")
    return DicomSeries(
        folder=folder,
        series_uid=uid,
        study_uid=str(first.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        modality=str(first.get("Modality", "")),
        description=str(first.get("SeriesDescription", "")),
        number=int(number) if number not in (None, "") else None,
        patient_id=str(first.get("PatientID", "")),
        orientation=tuple(float(v) for v in first.ImageOrientationPatient) if image else (),
        files=tuple(p for p, _ in members),
        sop_instance_uids=tuple(str(h.get("SOPInstanceUID", "")) for _, h in members),
        image=image,
    )


def list_series(folder: str | Path) -> list[DicomSeries]:
    """Every series under ``folder`` (searched recursively), image series first, each image series' files sorted
    along its slice normal (the geometry is checked only when one is read).

    Raises:
        InputNotFoundError: no such folder.
    """
    return _listing(Path(folder), _scan(Path(folder)))


def _listing(folder: Path, groups: dict[str, list[tuple[Path, pydicom.Dataset]]]) -> list[DicomSeries]:
    found = []
    for uid, members in groups.items():
        series = _series(folder, uid, members)
        if series.image:
            series = _series(folder, uid, _sorted(folder, uid, members, check=False))
        found.append(series)
    return sorted(found, key=lambda s: (not s.image, s.number if s.number is not None else 1 << 30, s.series_uid))


def choose_series(folder: str | Path, series_uid: str | None = None) -> DicomSeries:
    """The image series ``series_uid`` of ``folder``, or its only image series; geometry checked.

    Raises:
        DataError: no image series, several without ``series_uid`` (the message lists them), an unknown UID or a
            non-image one, mixed orientations, a gantry tilt, uneven or repeated slice positions.
    """
    folder = Path(folder)
    groups = _scan(folder)  # headers read once for the listing and the choice
    every = _listing(folder, groups)
    images = [s for s in every if s.image]
    listing = "; ".join(s.describe() for s in every)  # one line: the CLI prints errors in one
    if series_uid is None:
        if not images:
            raise DataError(f"{folder}: no DICOM image series" + (f" (found: {listing})" if every else ""))
        if len(images) > 1:
            raise DataError(f"{folder}: holds {len(images)} DICOM image series; pick one with --series UID: {listing}")
        series_uid = images[0].series_uid
    if series_uid not in groups:
        raise DataError(f"{folder}: no series {series_uid}; the folder holds: {listing}")
    chosen = _series(folder, series_uid, groups[series_uid])
    if not chosen.image:
        raise DataError(
            f"{folder}: series {series_uid} ({chosen.modality}) is not a series of single-frame images with a "
            f"geometry; the folder holds: {listing}"
        )
    return _series(folder, series_uid, _sorted(folder, series_uid, groups[series_uid], check=True))


def _sorted(folder: Path, uid: str, members: list[tuple[Path, pydicom.Dataset]], check: bool) -> list:
    """The members sorted along the slice normal; with ``check``, refused when no rectilinear grid holds them."""
    orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for _, h in members])
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for _, h in members])
    if check:
        distinct = np.unique(np.round(orientations / ORIENTATION_TOLERANCE).astype(np.int64), axis=0)
        if len(distinct) > 1:
            raise DataError(
                f"{folder}: series {uid} mixes {len(distinct)} slice orientations (ImageOrientationPatient "
                f"{' / '.join(_cosines(o) for o in distinct * ORIENTATION_TOLERANCE)}); a volume has one: "
                "export each plane as its own series"
            )
    row, column = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row, column)
    order = np.argsort(positions @ normal, kind="stable")
    members = [members[i] for i in order]
    if check and len(members) > 1:
        _check_stack(folder, uid, members, positions[order], normal)
    return members


def _cosines(values: np.ndarray) -> str:
    return "\\".join(f"{v:g}" for v in np.round(values, 4))


def _check_stack(folder: Path, uid: str, members: list, positions: np.ndarray, normal: np.ndarray) -> None:
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    if np.any(along < 0.01):
        repeated = int(np.sum(along < 0.01))
        raise DataError(
            f"{folder}: series {uid} has {repeated} slices at the position of another (several acquisitions or "
            "time points in one series?); export them as separate series"
        )
    sideways = np.linalg.norm(steps - along[:, None] * normal, axis=1)
    # the geometry decides, not GantryDetectorTilt: a tilted acquisition stored as an oblique stack is a valid grid
    if np.any(sideways > POSITION_TOLERANCE_MM + 1e-3 * along):
        angle = np.degrees(np.arctan2(float(sideways.max()), float(along.mean())))
        tag = float(members[0][1].get("GantryDetectorTilt", 0) or 0)
        stated = f", GantryDetectorTilt {tag:g}" if tag else ""
        raise DataError(
            f"{folder}: series {uid} was acquired with a gantry tilt (slices shift {sideways.max():.2f} mm "
            f"sideways per {along.mean():.2f} mm step, {angle:.1f} degrees{stated}); samadapt reads "
            "rectilinear grids only: resample it first (e.g. dcm2niix or 3D Slicer correct the tilt)"
        )
    if along.max() - along.min() > SPACING_TOLERANCE * along.mean() + POSITION_TOLERANCE_MM:
        raise DataError(
            f"{folder}: series {uid} has uneven slice gaps ({along.min():.3g} to {along.max():.3g} mm): missing "
            "slices? samadapt reads evenly spaced slices only"
        )


def read_series(folder: str | Path, series_uid: str | None = None) -> Volume:
    """The image series ``series_uid`` of ``folder`` (or its only one) as a ``Volume`` with ``volume.dicom`` set.

    Raises:
        DataError: as ``choose_series``, or pixel data SimpleITK cannot decode.
    """
    series = choose_series(folder, series_uid)
    try:
        if len(series.files) == 1:
            image = sitk.ReadImage(str(series.files[0]))
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames([str(p) for p in series.files])
            image = reader.Execute()
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataError(f"{series.folder}: series {series.series_uid}: cannot read its pixels ({first})") from error
    volume = from_itk(image, Path(folder))
    volume.dicom = series
    return volume


def series_of_file(path: str | Path) -> DicomSeries | None:
    """The one-file series of a single DICOM image with a geometry (None for anything else)."""
    path = Path(path)
    header = _header(path)
    if header is None or not _is_image(header):
        return None
    return _series(path.parent, str(header.SeriesInstanceUID), [(path, header)])


def write_source_record(volume: Volume, label_path: str | Path) -> Path:
    """Beside a label file predicted on a DICOM series, ``<name>.dicom.json``: the series' UIDs and orientation."""
    label_path = Path(label_path)
    if volume.dicom is None:
        raise DataError(f"{label_path}: {volume.path} was not read from DICOM; there is no series to record")
    stem = label_path.name[: -len(suffix_of(label_path))] if suffix_of(label_path) else label_path.name
    record = {"labels": label_path.name, **volume.dicom.record()}
    return atomic_write_text(label_path.with_name(f"{stem}.dicom.json"), json.dumps(record, indent=2))
