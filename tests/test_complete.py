"""``samadapt complete``: a few labelled slices of a real CT adapt a semantic model that labels the rest; the
labelled slices come back bit for bit, the others are the adapted run's own prediction."""

import numpy as np
import pytest

from samadapt.cli import main
from samadapt.complete import labelled_slices
from samadapt.data.io import Volume, read_label, read_volume
from samadapt.errors import DataError
from samadapt.predict import predict_volume
from samadapt.runs import load_run
from tests.data.conftest import write_nifti

LABELLED = [1, 4, 6]


def spleen(tmp_path):
    """The spleen of abdomen_ct s0009 on 8 slices (full 119 x 119 planes): the image, the full labels, and a
    label file holding only slices 1, 4 and 6 (what a user labelled)."""
    from tests.data.dicom_series import ABDOMEN, crop

    z, y, x = slice(173, 181), slice(0, 119), slice(0, 119)
    image = crop(read_volume(ABDOMEN / "imagesTr" / "s0009.nii.gz"), z, y, x)
    label = crop(read_label(ABDOMEN / "labelsTr" / "s0009.nii.gz"), z, y, x)
    full = (label.array == 7).astype(np.uint8)
    sparse = np.zeros_like(full)
    sparse[LABELLED] = full[LABELLED]
    paths = {}
    for name, array in (("image", image.array), ("sparse", sparse)):
        xyz = np.ascontiguousarray(array.transpose(2, 1, 0))
        paths[name] = write_nifti(tmp_path / f"{name}.nii.gz", xyz, zooms=(1.5, 1.5, 1.5), affine=image.affine)
    return paths, full


def test_the_labelled_slices_are_those_holding_a_label_or_the_ones_named():
    array = np.zeros((6, 4, 4), np.uint8)
    array[1, 0, 0] = array[4, 2, 2] = 1
    labels = Volume(array, (1.0, 1.0, 1.0), np.eye(4), "labels.nii.gz")
    assert labelled_slices(labels, 0) == [1, 4]
    assert labelled_slices(labels, 0, [0, 4, 4]) == [0, 4]  # an empty slice may be labelled too
    assert labelled_slices(labels, 2) == [0, 2]
    with pytest.raises(DataError, match="labels.nii.gz: slices \\[9\\] are outside"):
        labelled_slices(labels, 0, [9])
    with pytest.raises(DataError, match="labels.nii.gz: no slice holds a label"):
        labelled_slices(Volume(np.zeros((3, 2, 2)), (1.0, 1.0, 1.0), np.eye(4), "labels.nii.gz"), 0)


@pytest.mark.slow
def test_complete_adapts_on_three_slices_keeps_them_and_predicts_the_rest(tmp_path, capsys):
    paths, full = spleen(tmp_path)
    out, run_dir = tmp_path / "completed.nii.gz", tmp_path / "run"
    argv = ["complete", str(paths["sparse"]), str(paths["image"]), "--out", str(out), "--out-run", str(run_dir)]
    argv += ["--steps", "6", "--preprocessing", "ct_abdomen", "--set", "train.batch_size=2", "--device", "cpu"]
    assert main(argv) == 0
    completed = read_label(out).array
    assert completed.shape == full.shape
    np.testing.assert_array_equal(completed[LABELLED], full[LABELLED])  # kept bit for bit
    run = load_run(run_dir, checkpoint="last", device="cpu")
    assert run.task == "semantic" and run.classes == {1: "class 1"}
    own = predict_volume(run, read_volume(paths["image"]), preprocessing="ct_abdomen", axis=0, device="cpu")
    others = [z for z in range(8) if z not in LABELLED]
    np.testing.assert_array_equal(completed[others], own[others])  # the rest: the adapted run's prediction
    # again with the trained run: nothing trains, the same labels
    again = tmp_path / "again.nii.gz"
    args = ["complete", str(paths["sparse"]), str(paths["image"]), "--out", str(again), "--run", str(run_dir)]
    assert main([*args, "--device", "cpu"]) == 0
    np.testing.assert_array_equal(read_label(again).array, completed)


def test_complete_refuses_what_it_cannot_do(tmp_path, capsys):
    array = np.zeros((4, 8, 8), np.float32)
    image = write_nifti(tmp_path / "image.nii.gz", array)
    empty = write_nifti(tmp_path / "empty.nii.gz", array.astype(np.uint8))
    base = ["complete", str(empty), str(image), "--out", str(tmp_path / "o.nii.gz")]
    assert main([*base, "--out-run", str(tmp_path / "r")]) == 2
    assert "empty.nii.gz: no slice holds a label" in capsys.readouterr().err
    assert main(base) == 2
    assert "give --run RUN" in capsys.readouterr().err
    assert main([*base, "--run", "lite_medsam", "--slices", "1"]) == 2
    assert "lite_medsam is prompted: complete needs a semantic run" in capsys.readouterr().err
    assert main([*base, "--run", "lite_medsam", "--slices", "one"]) == 2
    assert "--slices 'one'" in capsys.readouterr().err
