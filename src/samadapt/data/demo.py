"""Real demo data from the package registries (no other download exists on these machines).

- ``lesions``: the five clinical volumes with lesion masks shipped in the pyradiomics 3.0.1 source archive
  (T1 brain MRI x 2, breast MRI, chest CT x 2); 27 labelled slices along the first (Z) axis.
- ``mni152``: the MNI ICBM152 2009a T1 template from nilearn's wheel, labelled background / grey matter / white
  matter by thresholding its probability maps at 0.5.

Both are written in the MSD layout under the cache directory (``$SAMADAPT_CACHE`` or ``~/.cache/samadapt``). The
downloads are checked against their SHA-256; a finished dataset is reused; a lock keeps two processes apart.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

PYRADIOMICS = (
    "pyradiomics==3.0.1",
    "pyradiomics-3.0.1.tar.gz",
    "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5",
)
NILEARN = (
    "nilearn==0.14.1",
    "nilearn-0.14.1-py3-none-any.whl",
    "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a",
)
LESION_CASES = ("brain1", "brain2", "breast1", "lung1", "lung2")
LESION_MODALITY = {"brain1": "MRI", "brain2": "MRI", "breast1": "MRI", "lung1": "CT", "lung2": "CT"}
MNI_FILES = {
    part: f"nilearn/datasets/data/mni_icbm152_{part}_tal_nlin_sym_09a_converted.nii.gz" for part in ("t1", "gm", "wm")
}


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("SAMADAPT_CACHE", Path.home() / ".cache" / "samadapt"))


def fetch_demo(cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Make sure both demo datasets exist in MSD layout; returns {"lesions": dir, "mni152": dir}."""
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / ".fetch.lock"):
        return {"lesions": _lesions(root), "mni152": _mni152(root)}


@contextmanager
def _lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(root: Path, spec: tuple[str, str, str], source: bool) -> Path:
    """pip download one file (checked by SHA-256) into root/downloads."""
    requirement, filename, sha256 = spec
    folder = root / "downloads"
    target = folder / filename
    if target.exists() and _sha256(target) == sha256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder), requirement]
    if source:  # the archive's metadata step needs setuptools, versioneer and wheel in this environment
        command[4:4] = ["--no-binary", ":all:", "--no-build-isolation"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not target.exists():
        raise RuntimeError(f"could not download {requirement} from the package index:\n{result.stderr.strip()[-2000:]}")
    actual = _sha256(target)
    if actual != sha256:
        target.unlink()
        raise RuntimeError(f"{target}: SHA-256 {actual} does not match the expected {sha256}")
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _finished(folder: Path) -> bool:
    return (folder / "dataset.json").exists()


def _publish(tmp: Path, folder: Path) -> Path:
    """Move a finished dataset into place in one rename."""
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def _lesions(root: Path) -> Path:
    folder = root / "lesions"
    if _finished(folder):
        return folder
    archive = _download(root, PYRADIOMICS, source=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".lesions-"))
    (tmp / "imagesTr").mkdir()
    (tmp / "labelsTr").mkdir()
    with tarfile.open(archive) as tar:
        for case in LESION_CASES:
            for part, sub in (("image", "imagesTr"), ("label", "labelsTr")):
                member = tar.getmember(f"pyradiomics-3.0.1/data/{case}_{part}.nrrd")
                with tar.extractfile(member) as source, open(tmp / sub / f"{case}.nrrd", "wb") as out:
                    shutil.copyfileobj(source, out)
    meta = {
        "name": "lesions",
        "description": "Lesion volumes shipped with pyradiomics 3.0.1 (brain / breast MRI, chest CT)",
        "reference": "pyradiomics 3.0.1 source archive, data/",
        "modality": {"0": "MRI"},
        "case_modality": LESION_MODALITY,
        "labels": {"0": "background", "1": "lesion"},
        "training": [{"image": f"./imagesTr/{c}.nrrd", "label": f"./labelsTr/{c}.nrrd"} for c in LESION_CASES],
        "test": [],
        # mixed MRI and CT: each slice clipped to its 0.5 / 99.5 percentiles, as in LiteMedSAM's evaluation
        "samadapt": {"preprocessing": "percentile_slice", "axis": 0},
    }
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
    return _publish(tmp, folder)


def _mni152(root: Path) -> Path:
    folder = root / "mni152"
    if _finished(folder):
        return folder
    wheel = _download(root, NILEARN, source=False)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".mni152-"))
    (tmp / "imagesTr").mkdir()
    (tmp / "labelsTr").mkdir()
    images = {}
    with zipfile.ZipFile(wheel) as archive:
        for part, member in MNI_FILES.items():
            path = tmp / f"{part}.nii.gz"
            path.write_bytes(archive.read(member))
            images[part] = nib.load(str(path))
    gm = np.asanyarray(images["gm"].dataobj).astype(np.float32)
    wm = np.asanyarray(images["wm"].dataobj).astype(np.float32)
    labels = np.zeros(gm.shape, np.uint8)
    labels[(gm > 0.5) & (gm >= wm)] = 1
    labels[(wm > 0.5) & (wm > gm)] = 2
    t1 = images["t1"]
    nib.save(
        nib.Nifti1Image(np.asanyarray(t1.dataobj).astype(np.float32), t1.affine),
        str(tmp / "imagesTr" / "mni152.nii.gz"),
    )
    label_image = nib.Nifti1Image(labels, t1.affine)
    label_image.set_data_dtype(np.uint8)
    nib.save(label_image, str(tmp / "labelsTr" / "mni152.nii.gz"))
    for part in MNI_FILES:
        (tmp / f"{part}.nii.gz").unlink()
    meta = {
        "name": "mni152",
        "description": "MNI ICBM152 2009a symmetric T1 template, grey / white matter at probability > 0.5",
        "reference": "nilearn 0.14.1 wheel, nilearn/datasets/data/",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "grey matter", "2": "white matter"},
        "training": [{"image": "./imagesTr/mni152.nii.gz", "label": "./labelsTr/mni152.nii.gz"}],
        "test": [],
        "samadapt": {"preprocessing": "mr", "axis": 0},
    }
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
    return _publish(tmp, folder)
