"""Real demo data from the package registries (no other download exists on these machines).

- ``lesions``: the five clinical volumes with lesion masks shipped in the pyradiomics 3.0.1 source archive
  (T1 brain MRI x 2, breast MRI, chest CT x 2), NRRD as shipped; 27 labelled slices along axis 0 (Z) in all,
  7 / 3 / 3 / 3 / 11 per case. Preprocessing ``percentile_slice`` for every case (see docs/data.md).
- ``mni152``: the MNI ICBM152 2009a symmetric T1 template from nilearn's wheel (197 x 233 x 189 voxels of 1 mm),
  labelled 0 background / 1 grey matter / 2 white matter where the tissue probability exceeds 0.5.

Both are written in the MSD layout under the cache directory (``$SAMADAPT_CACHE`` or ``~/.cache/samadapt``).
``pip download`` fetches the two files (checked against their SHA-256); nothing is installed or imported from them.
A finished dataset is reused (one file check); a file lock keeps two processes apart and every dataset appears by
one atomic rename, so an interrupted fetch leaves no half-written dataset behind.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from samadapt.data.dataset_writer import write_msd_dataset
from samadapt.data.io import cache_root
from samadapt.errors import DownloadError
from samadapt.files import atomic_folder
from samadapt.models.checkpoint import file_sha256

try:  # POSIX; elsewhere the atomic renames alone protect the cache
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

# bump when the content of a demo dataset changes, so old caches are rebuilt
DEMO_VERSION = 2
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


def fetch_demo(cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Make sure both demo datasets exist in MSD layout; returns {"lesions": dir, "mni152": dir}.

    Raises:
        RuntimeError: pip could not download a file, or a download does not match its SHA-256.
    """
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    if _finished(root / "lesions") and _finished(root / "mni152"):  # the fast path takes no lock
        return {"lesions": root / "lesions", "mni152": root / "mni152"}
    with _lock(root / ".fetch.lock"):
        return {"lesions": _lesions(root), "mni152": _mni152(root)}


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _download(root: Path, spec: tuple[str, str, str], source: bool) -> Path:
    """``pip download`` one file into root/downloads, checked by SHA-256 (a good earlier download is reused)."""
    requirement, filename, sha256 = spec
    folder = root / "downloads"
    target = folder / filename
    if target.exists() and file_sha256(target) == sha256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder)]
    if source:
        # pip prepares the sdist's metadata in this environment: it needs setuptools, wheel and versioneer here
        missing = [m for m in ("setuptools", "wheel", "versioneer", "numpy") if importlib.util.find_spec(m) is None]
        if missing:
            raise DownloadError(f"fetching {requirement} needs {', '.join(missing)}: pip install {' '.join(missing)}")
        command += ["--no-binary", ":all:", "--no-build-isolation"]
    else:
        command += ["--only-binary", ":all:"]
    result = subprocess.run([*command, requirement], capture_output=True, text=True)
    if result.returncode != 0 or not target.exists():
        raise DownloadError(
            f"could not download {requirement} from the package index:\n{result.stderr.strip()[-2000:]}"
        )
    actual = file_sha256(target)
    if actual != sha256:
        target.unlink()
        raise DownloadError(f"{target}: SHA-256 {actual} does not match the expected {sha256}")
    return target


def _finished(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "dataset.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("samadapt", {}).get("demo_version") == DEMO_VERSION


@contextmanager
def _building(root: Path, name: str) -> Iterator[Path]:
    """A temporary dataset folder beside the final one, renamed into place when the block succeeds."""
    with atomic_folder(root / name, replace=True) as tmp:  # replaces an older or broken version
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        yield tmp


def _labelled_slices(label_path: Path) -> list[int]:
    """Labelled slices of a label file along each axis of the (Z, Y, X) array."""
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))) > 0
    return [int(label.any(axis=tuple(k for k in range(3) if k != axis)).sum()) for axis in range(3)]


def _lesions(root: Path) -> Path:
    folder = root / "lesions"
    if _finished(folder):
        return folder
    archive = _download(root, PYRADIOMICS, source=True)
    with _building(root, "lesions") as tmp, tarfile.open(archive) as tar:
        for case in LESION_CASES:
            for part, sub in (("image", "imagesTr"), ("label", "labelsTr")):
                member = tar.getmember(f"pyradiomics-3.0.1/data/{case}_{part}.nrrd")
                with tar.extractfile(member) as source, open(tmp / sub / f"{case}.nrrd", "wb") as out:
                    shutil.copyfileobj(source, out)
        counts = {case: _labelled_slices(tmp / "labelsTr" / f"{case}.nrrd") for case in LESION_CASES}
        # MRI and CT mixed: every slice clipped to its own 0.5 / 99.5 percentiles, as in the LiteMedSAM reference
        write_msd_dataset(
            tmp,
            [f"{c}.nrrd" for c in LESION_CASES],
            {1: "lesion"},
            "mixed",
            "percentile_slice",
            name="lesions",
            description="Lesion volumes shipped with pyradiomics 3.0.1 (T1 brain MRI, breast MRI, chest CT)",
            reference="pyradiomics 3.0.1 source archive (PyPI), data/{case}_{image,label}.nrrd",
            case_modality=LESION_MODALITY,
            labelled_slices_per_axis=counts,
            samadapt_extra={"demo_version": DEMO_VERSION},
        )
    return folder


def tissue_labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """0 background / 1 grey matter / 2 white matter from probability maps (in [0, 1], or 8-bit 0..255).

    A voxel takes the tissue whose probability exceeds 0.5; where both do, the larger (grey matter on a tie).
    """
    scale = 255.0 if max(float(gm.max()), float(wm.max())) > 1.0 else 1.0  # nilearn ships the maps as uint8
    gm, wm = gm.astype(np.float32) / scale, wm.astype(np.float32) / scale
    labels = np.zeros(gm.shape, np.uint8)
    labels[(gm > 0.5) & (gm >= wm)] = 1
    labels[(wm > 0.5) & (wm > gm)] = 2
    return labels


def _mni152(root: Path) -> Path:
    folder = root / "mni152"
    if _finished(folder):
        return folder
    wheel = _download(root, NILEARN, source=False)
    with _building(root, "mni152") as tmp, zipfile.ZipFile(wheel) as archive:
        raw = {part: archive.read(member) for part, member in MNI_FILES.items()}
        maps = {p: nib.Nifti1Image.from_bytes(gzip.decompress(raw[p])) for p in ("gm", "wm", "t1")}
        labels = tissue_labels(np.asanyarray(maps["gm"].dataobj), np.asanyarray(maps["wm"].dataobj))
        (tmp / "imagesTr" / "mni152.nii.gz").write_bytes(raw["t1"])  # the template as shipped
        label_image = nib.Nifti1Image(labels, maps["t1"].affine, maps["t1"].header)
        label_image.set_data_dtype(np.uint8)
        label_image.header.set_slope_inter(1.0, 0.0)
        nib.save(label_image, str(tmp / "labelsTr" / "mni152.nii.gz"))
        write_msd_dataset(
            tmp,
            ["mni152.nii.gz"],
            {1: "grey matter", 2: "white matter"},
            "MRI",
            "mr",
            name="mni152",
            description="MNI ICBM152 2009a symmetric T1 template; grey / white matter where probability > 0.5",
            reference=f"{NILEARN[1]} (PyPI), {MNI_FILES['t1'].rsplit('/', 1)[0]}/",
            samadapt_extra={"demo_version": DEMO_VERSION},
        )
    return folder


REGION_NAMES = {
    1 + right + 2 * anterior + 4 * superior: (
        f"{'right' if right else 'left'} {'anterior' if anterior else 'posterior'} "
        f"{'superior' if superior else 'inferior'} grey matter"
    )
    for superior in (0, 1)
    for anterior in (0, 1)
    for right in (0, 1)
}


def grey_matter_regions(tissue: np.ndarray, affine: np.ndarray, grey: int = 1) -> np.ndarray:
    """Split the grey matter of a (Z, Y, X) tissue label map into 8 regions: hemisphere x anterior / posterior x
    superior / inferior (``REGION_NAMES``: 1 + right + 2 * anterior + 4 * superior; 0 elsewhere).

    Each split is at the median world coordinate (RAS millimetres through ``affine``, voxel (x, y, z) = array index
    [z, y, x]) of the grey-matter voxels, so the eight regions hold about the same number of voxels; on the symmetric
    MNI152 template the left / right split is the midline. A many-small-classes task for semantic segmentation: an
    axial slice holds the four regions of its half (superior or inferior).
    """
    tissue = np.asarray(tissue)
    if tissue.ndim != 3:
        raise ValueError(f"grey_matter_regions needs a (Z, Y, X) label map, got shape {tissue.shape}")
    zs, ys, xs = np.nonzero(tissue == grey)
    regions = np.zeros(tissue.shape, np.uint8)
    if zs.size == 0:
        return regions
    voxels = np.stack([xs, ys, zs]).astype(np.float64)
    world = np.asarray(affine, np.float64)[:3, :3] @ voxels + np.asarray(affine, np.float64)[:3, 3:4]
    right, anterior, superior = (world[k] > np.median(world[k]) for k in range(3))
    regions[zs, ys, xs] = 1 + right + 2 * anterior + 4 * superior
    return regions


def fetch_regions(cache_dir: str | Path | None = None) -> Path:
    """The ``mni152_regions`` dataset (MSD layout, beside the demo datasets): the MNI152 T1 template with its grey
    matter split into 8 regions (``grey_matter_regions``); built from the ``mni152`` demo dataset on first use."""
    root = cache_root(cache_dir)
    source = fetch_demo(cache_dir)["mni152"]
    folder = root / "mni152_regions"
    if _finished(folder):
        return folder
    with _lock(root / ".fetch.lock"):
        if _finished(folder):
            return folder
        with _building(root, "mni152_regions") as tmp:
            label = nib.load(str(source / "labelsTr" / "mni152.nii.gz"))
            tissue = np.transpose(np.asanyarray(label.dataobj), (2, 1, 0))  # NIfTI (x, y, z) -> (Z, Y, X)
            regions = np.transpose(grey_matter_regions(tissue, label.affine), (2, 1, 0))
            shutil.copyfile(source / "imagesTr" / "mni152.nii.gz", tmp / "imagesTr" / "mni152.nii.gz")
            region_image = nib.Nifti1Image(regions, label.affine, label.header)
            region_image.set_data_dtype(np.uint8)
            region_image.header.set_slope_inter(1.0, 0.0)
            nib.save(region_image, str(tmp / "labelsTr" / "mni152.nii.gz"))
            write_msd_dataset(
                tmp,
                ["mni152.nii.gz"],
                REGION_NAMES,
                "MRI",
                "mr",
                name="mni152_regions",
                description="MNI ICBM152 2009a T1 template; grey matter (probability > 0.5) split into 8 regions by "
                "hemisphere, anterior / posterior and superior / inferior at the grey matter's median coordinates",
                reference=json.loads((source / "dataset.json").read_text()).get("reference", ""),
                samadapt_extra={"demo_version": DEMO_VERSION},
            )
    return folder
