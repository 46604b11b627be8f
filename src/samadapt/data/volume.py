"""The in-memory volume (``Volume``) and what every reader shares: the file-suffix rule and SimpleITK images in.

Below ``io`` (which dispatches by format) and ``dicom`` (DICOM series), so that neither imports the other to build a
volume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from samadapt.errors import DataError

if TYPE_CHECKING:
    from samadapt.data.dicom import DicomSeries

# LPS (ITK) <-> RAS (NIfTI) world axes
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Volume:
    """An image or label volume.

    Attributes:
        array: (Z, Y, X) or (Z, Y, X, C) voxels.
        spacing: voxel size in mm, (z, y, x).
        affine: 4x4 matrix from voxel indices (x, y, z) = (i, j, k) to RAS world millimetres (NIfTI convention).
        path: where it was read from.
        header: the NIfTI header when read from NIfTI (kept to write labels back with the same header).
        dicom: the DICOM series it was read from (UIDs, orientation, files in Z order), for outputs that refer to it.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    path: Path | None = None
    header: nib.Nifti1Header | None = None
    dicom: DicomSeries | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def is_2d(self) -> bool:
        return self.array.shape[0] == 1

    @property
    def origin(self) -> tuple[float, float, float]:
        """World position of voxel (0, 0, 0) in ITK's LPS millimetres, (x, y, z) order."""
        return tuple(float(v) for v in _LPS_TO_RAS @ self.affine[:3, 3])

    @property
    def direction(self) -> np.ndarray:
        """ITK direction cosines (3, 3), LPS, columns for the x, y, z voxel axes."""
        linear = _LPS_TO_RAS @ self.affine[:3, :3]
        return linear / np.linalg.norm(linear, axis=0)


def suffix_of(path: str | Path) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def from_itk(image: sitk.Image, path: Path) -> Volume:
    """A SimpleITK image (LPS) as a ``Volume`` (RAS affine), 2D images as one slice; ``path`` names it in errors."""
    array = sitk.GetArrayFromImage(image)  # (Z, Y, X[, C]) or (Y, X[, C])
    if image.GetDimension() == 2:
        array = array[None]
        direction = np.eye(3)
        direction[:2, :2] = np.array(image.GetDirection()).reshape(2, 2)
        spacing_xyz = (*image.GetSpacing(), 1.0)
        origin = (*image.GetOrigin(), 0.0)
    elif image.GetDimension() == 3:
        direction = np.array(image.GetDirection()).reshape(3, 3)
        spacing_xyz = image.GetSpacing()
        origin = image.GetOrigin()
    else:
        raise DataError(f"{path}: expected a 2D or 3D image, got {image.GetDimension()} dimensions")
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(spacing_xyz)
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(origin)
    return Volume(array=array, spacing=tuple(float(s) for s in spacing_xyz[::-1]), affine=affine, path=path)
