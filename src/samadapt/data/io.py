"""Reading images and writing label volumes, keeping the grid (spacing, origin, orientation) of the input.

Every reader returns a ``Volume`` whose array is ordered (Z, Y, X) (or (Z, Y, X, C) for colour), whatever the file
format: NIfTI arrays are transposed from nibabel's (i, j, k), 2D images become Z = 1. ``write_label`` puts a label
array back on a reference volume's grid and header, so a prediction opens aligned in any viewer.

The grid is kept as one 4x4 ``affine`` in NIfTI's convention (voxel (i, j, k) = (x, y, z) -> RAS millimetres), for
every format: ITK's origin / direction (LPS) are converted on read and back on write.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from PIL import Image

from samadapt.data.volume import _LPS_TO_RAS, Volume, from_itk, suffix_of
from samadapt.errors import DataError, InputNotFoundError
from samadapt.files import atomic_write

NIFTI = (".nii", ".nii.gz")
ITK = (".nrrd", ".nhdr", ".mha", ".mhd")
PICTURES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NPZ = (".npz",)
NPZ_IMAGE_KEYS = ("image", "imgs")
NPZ_LABEL_KEYS = ("label", "gts", "seg")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where samadapt keeps downloads and indexes: ``cache_dir``, else ``$SAMADAPT_CACHE``, else ~/.cache/samadapt."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("SAMADAPT_CACHE") or Path.home() / ".cache" / "samadapt")


def read_volume(path: str | Path, key: str | None = None, series: str | None = None) -> Volume:
    """Read NIfTI, NRRD / MHA / MHD, a DICOM series (a directory), PNG / JPEG / BMP / TIFF, or NPZ.

    Args:
        path: the file, or a directory holding DICOM series (``data.dicom``: geometry checked, ``volume.dicom`` set).
        key: NPZ only: the array to read (default: the first of ``image``, ``imgs``, ``label``, ``gts``, ``seg``).
        series: a directory only: the SeriesInstanceUID to read when it holds several series.

    Raises:
        FileNotFoundError: the path does not exist. DataError: unknown format, or an unreadable / corrupt file.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{path}: no such file or directory")
    suffix = suffix_of(path)
    try:
        if path.is_dir():
            from samadapt.data.dicom import read_series

            return read_series(path, series)
        if series is not None:
            raise DataError(f"{path}: --series picks a series of a DICOM folder; this is a file")
        if suffix in NIFTI:
            return _read_nifti(path)
        if suffix == ".dcm":
            from samadapt.data.dicom import series_of_file

            volume = from_itk(sitk.ReadImage(str(path)), path)
            volume.dicom = series_of_file(path)  # one slice alone is a 2D image; still referable
            return volume
        if suffix in ITK:
            return from_itk(sitk.ReadImage(str(path)), path)
        if suffix in PICTURES:
            return _read_picture(path)
        if suffix in NPZ:
            return _read_npz(path, key)
    except DataError:
        raise
    except Exception as error:  # the readers raise many types for truncated or corrupt files
        lines = str(error).strip().splitlines() or [""]
        raise DataError(f"{path}: cannot read, corrupt or truncated? ({type(error).__name__}: {lines[0]})") from error
    raise DataError(f"{path}: unknown image format {suffix!r}; use NIfTI, NRRD, MHA, DICOM, PNG, JPEG or NPZ")


def read_label(path: str | Path) -> Volume:
    """Read a label volume: NPZ files give their label array; a colour mask with equal channels becomes one channel.

    Raises:
        DataError: a colour mask whose channels differ (not a label map).
    """
    path = Path(path)
    key = None
    if suffix_of(path) in NPZ:
        with np.load(path, allow_pickle=False) as npz:
            key = next((k for k in NPZ_LABEL_KEYS if k in npz), None)
    volume = read_volume(path, key)
    if volume.array.ndim == 4:  # masks saved as RGB(A) pictures
        array = volume.array[..., :3]
        if not (array == array[..., :1]).all():
            raise DataError(f"{path}: a colour label image; labels must be one channel of integer class ids")
        volume.array = array[..., 0]
    return volume


def _read_nifti(path: Path) -> Volume:
    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj)  # reads everything now, so a truncated file fails here
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {data.shape} (one channel per file, please)")
    zooms = image.header.get_zooms()[:3]
    zooms = (*zooms, *(1.0,) * (3 - len(zooms)))
    return Volume(
        array=np.ascontiguousarray(data.transpose(2, 1, 0)),
        spacing=tuple(float(z) for z in zooms[::-1]),
        affine=image.affine.copy(),
        path=path,
        header=image.header.copy(),
    )


def _read_picture(path: Path) -> Volume:
    with Image.open(path) as picture:
        picture.load()
        if picture.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
            array = np.asarray(picture.convert("RGB"))[None]
        elif picture.mode.startswith("I;16"):
            array = np.asarray(picture.convert("I"))[None]
        else:
            array = np.asarray(picture)[None]
    return Volume(array=array, spacing=(1.0, 1.0, 1.0), path=path)


def _read_npz(path: Path, key: str | None) -> Volume:
    """NPZ as MedSAM stores it: ``imgs`` (Z, Y, X) or (H, W, 3), ``gts``, ``spacing`` in SimpleITK's (x, y, z) order.

    A ``spacing_zyx`` array, when present, is taken as is (our own order).
    """
    with np.load(path, allow_pickle=False) as npz:
        if key is None:
            key = next((k for k in (*NPZ_IMAGE_KEYS, *NPZ_LABEL_KEYS) if k in npz), None)
        if key is None or key not in npz:
            wanted = repr(key) if key else "an 'image' / 'imgs' / 'label' / 'gts'"
            raise DataError(f"{path}: NPZ without {wanted} array (has {list(npz)})")
        array = npz[key]
        labels = next((npz[k] for k in NPZ_LABEL_KEYS if k in npz), None)
        if "spacing_zyx" in npz:
            spacing = [float(s) for s in npz["spacing_zyx"]]
        elif "spacing" in npz:
            spacing = [float(s) for s in npz["spacing"]][::-1]
        else:
            spacing = []
    # a 2D colour image (H, W, 3): its label is 2D, or (without one) the last axis holds 3 / 4 channels
    colour_2d = array.ndim == 3 and array.shape[-1] in (3, 4) and (labels is None or labels.ndim == 2)
    if array.ndim == 2 or colour_2d:
        array = array[None]
        spacing = [1.0, *spacing[-2:]] if len(spacing) >= 2 else []
    if array.ndim not in (3, 4):
        raise DataError(f"{path}: NPZ array {key!r} has shape {array.shape}; expected (Z, Y, X) or (H, W[, 3])")
    if len(spacing) != 3:
        spacing = [1.0, 1.0, 1.0]
    return Volume(array=array, spacing=tuple(spacing), path=path)


def check_pair(image: Volume, label: Volume, spacing_tolerance: float = 1e-3) -> None:
    """An image and its label must share the voxel grid (spacing equal within a relative ``spacing_tolerance``).

    Raises:
        DataError: naming the label file, with both shapes or spacings.
    """
    if image.array.shape[:3] != label.array.shape[:3]:
        raise DataError(
            f"{label.path}: label shape {label.array.shape[:3]} differs from image {image.path} "
            f"shape {image.array.shape[:3]}"
        )
    if not np.allclose(image.spacing, label.spacing, rtol=spacing_tolerance, atol=1e-5):
        raise DataError(
            f"{label.path}: label spacing {tuple(round(s, 5) for s in label.spacing)} differs from image "
            f"{image.path} spacing {tuple(round(s, 5) for s in image.spacing)}"
        )


def check_label_values(label: Volume, allowed: set[int]) -> None:
    """Labels must be integers among the dataset's classes.

    Raises:
        DataError: non-integer values, or values that are not classes, naming the file.
    """
    array = label.array
    if array.dtype.kind == "f" and not np.all(np.equal(np.mod(array, 1), 0)):
        raise DataError(f"{label.path}: label holds non-integer values; labels must be integer class ids")
    if array.dtype.kind not in "biuf":
        raise DataError(f"{label.path}: label of type {array.dtype}; labels must be integer class ids")
    values = {int(v) for v in np.unique(array)}
    unexpected = sorted(values - allowed)
    if unexpected:
        raise DataError(
            f"{label.path}: label values {unexpected} are not classes of dataset.json (classes: {sorted(allowed)})"
        )


def _label_dtype(labels: np.ndarray, path: Path) -> type:
    low, high = int(labels.min(initial=0)), int(labels.max(initial=0))
    if low < 0:
        raise DataError(f"{path}: negative label values ({low}); class ids are >= 0")
    return np.uint8 if high < 256 else np.uint16 if high < 65536 else np.int32


def write_label(reference: Volume, labels: np.ndarray, path: str | Path) -> Path:
    """Write a (Z, Y, X) integer label array on ``reference``'s grid; the format follows ``path``'s suffix.

    NIfTI keeps the reference's affine (and header when it was NIfTI); NRRD / MHA keep origin, spacing and
    direction; PNG is for 2D (Z = 1) only. Labels are stored as the smallest unsigned integer type that fits.

    Raises:
        DataError: the labels do not fit the reference grid, are negative, or the suffix is not writable.
    """
    path = Path(path)
    labels = np.asarray(labels)
    if labels.shape != reference.array.shape[:3]:
        raise DataError(
            f"{path}: labels of shape {labels.shape} do not fit the reference grid {reference.array.shape[:3]}"
        )
    dtype = _label_dtype(labels, path)
    labels = labels.astype(dtype)
    suffix = suffix_of(path)
    if suffix not in (*NIFTI, *ITK, ".png"):
        raise DataError(f"{path}: cannot write labels as {suffix!r}; use .nii.gz, .nrrd, .mha or .png")
    if suffix == ".png":
        if labels.shape[0] != 1:
            raise DataError(f"{path}: a picture holds one slice, the labels have {labels.shape[0]}")
        if dtype != np.uint8:
            raise DataError(f"{path}: PNG labels hold class ids up to 255; use .nii.gz or .nrrd")
    # a killed job never leaves half a file
    return atomic_write(path, lambda tmp: _write_label_file(reference, labels, dtype, suffix, tmp))


def _write_label_file(reference: Volume, labels: np.ndarray, dtype, suffix: str, target: Path) -> None:
    if suffix in NIFTI:
        header = reference.header.copy() if reference.header is not None else None
        image = nib.Nifti1Image(labels.transpose(2, 1, 0), reference.affine, header)
        image.set_data_dtype(dtype)
        image.header.set_zooms(tuple(reference.spacing[::-1]))
        image.header.set_slope_inter(1.0, 0.0)  # the image's intensity scaling must not rescale class ids
        nib.save(image, str(target))
    elif suffix in ITK:
        image = sitk.GetImageFromArray(labels)
        linear = _LPS_TO_RAS @ reference.affine[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        image.SetSpacing(tuple(float(s) for s in spacing))
        image.SetDirection(tuple(float(v) for v in (linear / spacing).ravel()))
        image.SetOrigin(reference.origin)
        sitk.WriteImage(image, str(target), useCompression=True)
    else:
        Image.fromarray(labels[0]).save(target)
