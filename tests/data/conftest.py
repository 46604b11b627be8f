"""Tiny synthetic files for the data-layer tests."""

import argparse
import json

import nibabel as nib
import numpy as np
import pytest


def write_nifti(path, array_xyz, zooms=(0.8, 0.9, 2.5), affine=None):
    """A NIfTI file from an (i, j, k) array; the default affine is diagonal with the zooms and an offset."""
    if affine is None:
        affine = np.diag([*zooms, 1.0])
        affine[:3, 3] = [10.0, -20.0, 5.0]
    image = nib.Nifti1Image(array_xyz, affine)
    image.header.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def write_msd(root, cases=2, shape=(8, 16, 12), label_value=1, spacing_mismatch=False, shape_mismatch=False):
    """An MSD dataset of ``cases`` random CT-like volumes (NIfTI shape (i, j, k) = ``shape``) with a box lesion."""
    training = []
    rng = np.random.default_rng(0)
    for i in range(cases):
        image = rng.normal(size=shape).astype(np.float32) * 100
        label = np.zeros(shape, np.uint8)
        label[2:5, 3:8, 2 + i : 4 + i] = label_value
        write_nifti(root / "imagesTr" / f"case{i}.nii.gz", image)
        zooms = (0.8, 0.9, 3.0) if spacing_mismatch else (0.8, 0.9, 2.5)
        write_nifti(root / "labelsTr" / f"case{i}.nii.gz", label[:-1] if shape_mismatch else label, zooms=zooms)
        training.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    meta = {"labels": {"0": "background", "1": "tumour"}, "modality": {"0": "CT"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def nifti():
    """``write_nifti(path, array_xyz, zooms=..., affine=None)``."""
    return write_nifti


@pytest.fixture
def msd(tmp_path):
    """A two-case MSD dataset; call it with ``write_msd`` keyword arguments for variants."""
    return lambda **kwargs: write_msd(tmp_path / "msd", **kwargs)


@pytest.fixture
def data_cli():
    """Run ``samadapt data ...`` argv through the data sub-commands alone (the full CLI imports every area)."""
    from samadapt.cli.data import register

    def run(argv: list[str]) -> int:
        parser = argparse.ArgumentParser(prog="samadapt")
        register(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)

    return run
