"""Small real DICOM series for the tests: crops of the shared CT / MR volumes written slice by slice with pydicom.

The pixels are the volumes' own (CT in HU through RescaleIntercept, MR z-scores x 1000) and the geometry is theirs
(ImagePositionPatient / ImageOrientationPatient / PixelSpacing from the NIfTI affine), so a reader that gets the grid
wrong lands on different voxels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from samadapt.data.io import Volume, read_label, read_volume

# the real labelled CT / MRI beside the clone (as bench/accuracy.py finds it; SAMADAPT_SHARED_DATA overrides)
SHARED = Path(os.environ.get("SAMADAPT_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
ABDOMEN = SHARED / "abdomen_ct"
BRATS = SHARED / "brats_flair"
HN = SHARED / "hn_oar"
_LPS = np.diag([-1.0, -1.0, 1.0])


def crop(volume: Volume, z: slice, y: slice, x: slice) -> Volume:
    """A crop of ``volume`` with its affine moved to the crop's first voxel."""
    affine = volume.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([x.start or 0, y.start or 0, z.start or 0]) + affine[:3, 3]
    return Volume(np.ascontiguousarray(volume.array[z, y, x]), volume.spacing, affine, volume.path)


def ct_case() -> tuple[Volume, Volume]:
    """6 axial slices of 64 x 64 of abdomen_ct s0009 (1.5 mm voxels) holding 7 of its 8 organs (the crop of that
    size with the most organs)."""
    image = read_volume(ABDOMEN / "imagesTr" / "s0009.nii.gz")
    label = read_label(ABDOMEN / "labelsTr" / "s0009.nii.gz")
    z, y, x = slice(158, 164), slice(55, 119), slice(35, 99)
    return crop(image, z, y, x), crop(label, z, y, x)


def hn_case() -> tuple[Volume, Volume]:
    """6 slices of 40 x 40 of hn_oar pt_119 (4.69 x 4.69 x 3 mm): rows run left-right and columns front-back
    (ImageOrientationPatient 0\\1\\0\\1\\0\\0), slices go down the body: every axis differs from the others."""
    image = read_volume(HN / "imagesTr" / "pt_119.nii.gz")
    label = read_label(HN / "labelsTr" / "pt_119.nii.gz")
    z, y, x = slice(51, 57), slice(44, 84), slice(38, 78)
    return crop(image, z, y, x), crop(label, z, y, x)


def mr_case() -> tuple[Volume, Volume]:
    """5 axial slices of 64 x 64 through the tumour of brats_flair pat0001 (1 mm voxels)."""
    image = read_volume(BRATS / "imagesTr" / "brats_2013_pat0001_1.nii.gz")
    label = read_label(BRATS / "labelsTr" / "brats_2013_pat0001_1.nii.gz")
    z, y, x = _busiest(label.array, (5, 64, 64))
    return crop(image, z, y, x), crop(label, z, y, x)


def _busiest(labels: np.ndarray, size: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """The crop of ``size`` centred on the labelled voxels' centre (so most classes show)."""
    centre = np.argwhere(labels > 0).mean(axis=0).astype(int)
    starts = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip(centre, size, labels.shape, strict=True)]
    return tuple(slice(a, a + s) for a, s in zip(starts, size, strict=True))


def write_series(
    volume: Volume,
    folder: Path,
    modality: str = "CT",
    series_uid: str | None = None,
    study_uid: str = "1.2.826.0.1.3680043.8.498.1",
    frame_uid: str = "1.2.826.0.1.3680043.8.498.2",
    series_number: int = 1,
    tilt_mm: float = 0.0,
    tilted_orientation_at: int | None = None,
    shuffle: bool = True,
    decimals: int = 4,
) -> tuple[str, list[Path]]:
    """Write ``volume`` as one single-frame file per slice (in shuffled file order); returns (series UID, files).

    ``tilt_mm`` shifts each slice that far along the column direction (a gantry tilt); ``tilted_orientation_at``
    gives that slice another orientation (a mixed-orientation series); ``decimals``: the positions' rounding.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    linear = _LPS @ volume.affine[:3, :3]  # LPS, columns for x, y, z
    spacing = np.linalg.norm(linear, axis=0)
    row, column, normal = (linear / spacing).T
    origin = _LPS @ volume.affine[:3, 3]
    if modality == "CT":
        pixels, intercept, sop_class = (volume.array.astype(np.int32) + 1024).astype(np.int16), -1024.0, CTImageStorage
    else:
        pixels, intercept, sop_class = np.round(volume.array * 1000).astype(np.int16), None, MRImageStorage
    order = np.random.default_rng(0).permutation(len(pixels)) if shuffle else np.arange(len(pixels))
    files = []
    for z in order:
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Case", "SAMADAPT01", "", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study_uid, "20260101", "120000", "1"
        ds.ReferringPhysicianName, ds.AccessionNumber = "", ""
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series_uid, series_number
        ds.SeriesDescription = f"{modality} crop"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.Manufacturer = "samadapt tests"
        ds.InstanceNumber = int(z) + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        cosines = np.concatenate([row, column])
        if tilted_orientation_at is not None and z == tilted_orientation_at:
            turn = np.radians(10)
            cosines = np.concatenate([row, np.cos(turn) * column + np.sin(turn) * normal])
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in cosines]
        position = origin + z * spacing[2] * normal + z * tilt_mm * column
        ds.ImagePositionPatient = [f"{v:.{decimals}f}" for v in position]
        ds.PixelSpacing = [f"{spacing[1]:.6g}", f"{spacing[0]:.6g}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{spacing[2]:.6g}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape[1:]
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        if intercept is not None:
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{intercept:g}", "1", "HU"
            ds.KVP = "120"
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
            ds.MRAcquisitionType, ds.EchoTime, ds.RepetitionTime = "2D", "100", "9000"
        ds.PixelData = np.ascontiguousarray(pixels[z]).tobytes()
        path = folder / f"S{series_number}IM{int(z) * 7 % 97:04d}_{len(files)}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return series_uid, files
