"""Reading images and writing label volumes, keeping the grid (spacing, origin, orientation) of the input.

Every reader returns a ``Volume`` whose array is ordered (Z, Y, X) (or (Z, Y, X, C) for colour), whatever the file
format: NIfTI arrays are transposed from nibabel's (i, j, k), 2D images become Z = 1. ``write_label`` puts a label
array back on a reference volume's grid and header, so a prediction opens aligned in any viewer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from PIL import Image

NIFTI = (".nii", ".nii.gz")
ITK = (".nrrd", ".nhdr", ".mha", ".mhd")
PICTURES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NPZ = (".npz",)
# LPS (ITK) <-> RAS (NIfTI) world axes
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and the problem."""


@dataclass
class Volume:
    """An image or label volume.

    Attributes:
        array: (Z, Y, X) or (Z, Y, X, C) voxels.
        spacing: voxel size in mm, (z, y, x).
        affine: 4x4 matrix from (x, y, z) = (i, j, k) voxel indices to RAS world millimetres (NIfTI convention).
        path: where it was read from.
        header: the NIfTI header when read from NIfTI (kept to write labels back with the same header).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    path: Path | None = None
    header: nib.Nifti1Header | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def is_2d(self) -> bool:
        return self.array.shape[0] == 1


def suffix_of(path: str | Path) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def read_volume(path: str | Path) -> Volume:
    """Read NIfTI, NRRD / MHA / MHD, a DICOM series (a directory), PNG / JPEG / BMP / TIFF, or NPZ.

    Raises:
        FileNotFoundError: the path does not exist. DataError: unknown format, or an unreadable / corrupt file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    suffix = suffix_of(path)
    try:
        if path.is_dir():
            return _read_dicom_series(path)
        if suffix in NIFTI:
            return _read_nifti(path)
        if suffix in ITK or suffix == ".dcm":
            return _from_itk(sitk.ReadImage(str(path)), path)
        if suffix in PICTURES:
            return _read_picture(path)
        if suffix in NPZ:
            return _read_npz(path)
    except DataError:
        raise
    except Exception as error:  # the readers raise many types for truncated or corrupt files
        raise DataError(
            f"{path}: cannot read ({type(error).__name__}: {str(error).strip().splitlines()[0]})"
        ) from error
    raise DataError(f"{path}: unknown image format {suffix!r}; use NIfTI, NRRD, MHA, DICOM, PNG, JPEG or NPZ")


def _read_nifti(path: Path) -> Volume:
    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj)
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {data.shape} (one channel per file, please)")
    zooms = image.header.get_zooms()[:3]
    return Volume(
        array=np.ascontiguousarray(data.transpose(2, 1, 0)),
        spacing=tuple(float(z) for z in zooms[::-1]),
        affine=image.affine.copy(),
        path=path,
        header=image.header.copy(),
    )


def _from_itk(image: sitk.Image, path: Path) -> Volume:
    array = sitk.GetArrayFromImage(image)
    if image.GetDimension() == 2:
        array = array[None]
        spacing = (1.0, *image.GetSpacing()[::-1])
        origin = (*image.GetOrigin(), 0.0)
        direction = np.eye(3)
        direction[:2, :2] = np.array(image.GetDirection()).reshape(2, 2)
        spacing_xyz = (*image.GetSpacing(), 1.0)
    else:
        spacing = tuple(float(s) for s in image.GetSpacing()[::-1])
        origin = image.GetOrigin()
        direction = np.array(image.GetDirection()).reshape(3, 3)
        spacing_xyz = image.GetSpacing()
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(spacing_xyz)
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(origin)
    return Volume(array=array, spacing=spacing, affine=affine, path=path)


def _read_dicom_series(folder: Path) -> Volume:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise DataError(f"{folder}: a directory without a DICOM series")
    if len(series) > 1:
        raise DataError(f"{folder}: holds {len(series)} DICOM series; point to one series per directory")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return _from_itk(reader.Execute(), folder)


def _read_picture(path: Path) -> Volume:
    with Image.open(path) as picture:
        picture.load()
        if picture.mode in ("RGB", "RGBA", "P", "CMYK"):
            array = np.asarray(picture.convert("RGB"))[None]
        else:
            array = np.asarray(picture.convert("I") if picture.mode.startswith("I;16") else picture)[None]
    return Volume(array=array, spacing=(1.0, 1.0, 1.0), path=path)


def _read_npz(path: Path) -> Volume:
    with np.load(path, allow_pickle=False) as npz:
        key = next((k for k in ("image", "imgs", "label", "gts", "seg") if k in npz), None)
        if key is None:
            raise DataError(f"{path}: NPZ without an 'image' / 'imgs' / 'label' / 'gts' array (has {list(npz)})")
        array = npz[key]
        spacing = tuple(float(s) for s in npz["spacing"]) if "spacing" in npz else (1.0, 1.0, 1.0)
    if array.ndim == 2:
        array = array[None]
    return Volume(array=array, spacing=spacing, path=path)


def check_pair(image: Volume, label: Volume, spacing_tolerance: float = 1e-3) -> None:
    """An image and its label must share the voxel grid."""
    if image.array.shape[:3] != label.array.shape[:3]:
        raise DataError(
            f"{label.path}: label shape {label.array.shape[:3]} differs from image {image.path} shape {image.array.shape[:3]}"
        )
    if not np.allclose(image.spacing, label.spacing, rtol=spacing_tolerance, atol=spacing_tolerance):
        raise DataError(
            f"{label.path}: label spacing {label.spacing} differs from image {image.path} spacing {image.spacing}"
        )


def check_label_values(label: Volume, allowed: set[int]) -> None:
    """Labels must be integers among the dataset's classes."""
    array = label.array
    if array.dtype.kind == "f" and not np.all(np.equal(np.mod(array, 1), 0)):
        raise DataError(f"{label.path}: label holds non-integer values; labels must be integer class ids")
    values = {int(v) for v in np.unique(array)}
    unexpected = sorted(values - allowed)
    if unexpected:
        raise DataError(
            f"{label.path}: label values {unexpected} are not classes of dataset.json (classes: {sorted(allowed)})"
        )


def write_label(reference: Volume, labels: np.ndarray, path: str | Path) -> Path:
    """Write a (Z, Y, X) integer label array on ``reference``'s grid; the format follows ``path``'s suffix.

    NIfTI keeps the reference's affine (and header when it was NIfTI); NRRD / MHA keep origin, spacing and
    direction; PNG is for 2D (Z = 1) only.
    """
    path = Path(path)
    labels = np.asarray(labels)
    if labels.shape != reference.array.shape[:3]:
        raise DataError(
            f"{path}: labels of shape {labels.shape} do not fit the reference grid {reference.array.shape[:3]}"
        )
    dtype = np.uint8 if labels.max(initial=0) < 256 and labels.min(initial=0) >= 0 else np.int16
    labels = labels.astype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix_of(path)
    if suffix in NIFTI:
        header = reference.header.copy() if reference.header is not None else None
        image = nib.Nifti1Image(labels.transpose(2, 1, 0), reference.affine, header)
        image.set_data_dtype(dtype)
        image.header.set_zooms(tuple(reference.spacing[::-1]))
        image.header["scl_slope"], image.header["scl_inter"] = 1.0, 0.0
        nib.save(image, str(path))
    elif suffix in ITK:
        image = sitk.GetImageFromArray(labels)
        linear = _LPS_TO_RAS @ reference.affine[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        image.SetSpacing(tuple(float(s) for s in spacing))
        image.SetDirection(tuple(float(v) for v in (linear / spacing).ravel()))
        image.SetOrigin(tuple(float(v) for v in _LPS_TO_RAS @ reference.affine[:3, 3]))
        sitk.WriteImage(image, str(path), useCompression=True)
    elif suffix in PICTURES:
        if labels.shape[0] != 1:
            raise DataError(f"{path}: a picture holds one slice, the labels have {labels.shape[0]}")
        Image.fromarray(labels[0].astype(np.uint8)).save(path)
    else:
        raise DataError(f"{path}: cannot write labels as {suffix!r}; use .nii.gz, .nrrd, .mha or .png")
    return path
