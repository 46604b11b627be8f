"""Safe writes (one owner: samadapt.files) and the dataset writer that mirrors the dataset loader."""

import nibabel as nib
import numpy as np
import pytest

from samadapt.data.dataset_writer import write_msd_dataset
from samadapt.data.datasets import load_dataset
from samadapt.errors import DataError
from samadapt.files import atomic_folder, atomic_write, atomic_write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path):
    target = atomic_write_text(tmp_path / "sub" / "report.json", "old")
    assert target.read_text() == "old"

    def half_then_crash(tmp):
        tmp.write_text("half of the new content")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_the_temporary_name_keeps_the_suffix_for_writers_that_pick_a_format_by_it(tmp_path):
    seen = []
    atomic_write(tmp_path / "label.nii.gz", lambda tmp: seen.append(tmp.name) or tmp.write_bytes(b"x"))
    assert seen[0].endswith("label.nii.gz") and seen[0].startswith(".partial-")


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    with pytest.raises(RuntimeError, match="killed"), atomic_folder(tmp_path / "dataset") as tmp:
        (tmp / "a.txt").write_text("a")
        raise RuntimeError("killed half way")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(tmp_path / "dataset") as tmp:
        (tmp / "a.txt").write_text("a")
    with atomic_folder(tmp_path / "dataset", replace=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert [p.name for p in (tmp_path / "dataset").iterdir()] == ["b.txt"]
    with pytest.raises(OSError), atomic_folder(tmp_path / "dataset") as tmp:  # not empty, no replace: refused
        (tmp / "c.txt").write_text("c")
    assert [p.name for p in (tmp_path / "dataset").iterdir()] == ["b.txt"]


def test_write_msd_dataset_is_read_back_by_load_dataset(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for case in ("a", "b"):
        volume = np.zeros((8, 8, 3), np.float32)
        label = np.zeros((8, 8, 3), np.uint8)
        label[2:5, 2:5, 1] = 2
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "imagesTr" / f"{case}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / "labelsTr" / f"{case}.nii.gz"))
    write_msd_dataset(
        tmp_path, ["a.nii.gz", "b.nii.gz"], {2: "liver"}, "CT", "ct_abdomen", axis=1, name="toy", reference="test"
    )
    spec = load_dataset(tmp_path)
    assert [c.id for c in spec.cases] == ["a", "b"] and spec.classes == {2: "liver"}
    assert spec.modality == "CT" and spec.preprocessing == "ct_abdomen" and spec.axis == 1
    assert spec.meta["name"] == "toy" and spec.meta["reference"] == "test" and spec.meta["numTraining"] == 2
    with pytest.raises(DataError, match="c.nii.gz: listed in dataset.json but not written"):
        write_msd_dataset(tmp_path, ["a.nii.gz", "c.nii.gz"], {2: "liver"}, "CT", "ct_abdomen")
    assert load_dataset(tmp_path).meta["name"] == "toy"  # the refused call left the old dataset.json
