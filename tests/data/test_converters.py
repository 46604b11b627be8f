"""Converters on tiny synthetic copies of each public layout."""

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from samadapt.data import SliceDataset, load_dataset
from samadapt.data.converters import SYNAPSE_CLASSES, convert_brats, convert_synapse
from samadapt.errors import DataError


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([0.7, 0.7, 3.0, 1.0])), str(path))


def test_synapse_label_map(tmp_path, data_cli):
    src = tmp_path / "raw"
    label = np.zeros((8, 8, 4), np.uint8)
    for btcv, (x, y) in {
        1: (0, 0),
        2: (0, 1),
        3: (0, 2),
        4: (0, 3),
        6: (1, 0),
        7: (1, 1),
        8: (1, 2),
        11: (1, 3),
    }.items():
        label[x, y, :] = btcv
    label[2, 2, :] = 5  # esophagus -> background
    label[3, 3, :] = 13  # adrenal gland -> background
    save(src / "img" / "img0001.nii.gz", np.full((8, 8, 4), -1000, np.int16))
    save(src / "label" / "label0001.nii.gz", label)
    assert data_cli(["data", "convert", "synapse", str(src), str(tmp_path / "msd")]) == 0
    spec = load_dataset(tmp_path / "msd")
    assert spec.classes == SYNAPSE_CLASSES and spec.preprocessing == "ct_synapse" and spec.modality == "CT"
    assert list(SYNAPSE_CLASSES.values()) == [
        "spleen",
        "right kidney",
        "left kidney",
        "gallbladder",
        "liver",
        "stomach",
        "aorta",
        "pancreas",
    ]
    out = np.asanyarray(nib.load(str(tmp_path / "msd" / "labelsTr" / "img0001.nii.gz")).dataobj)
    assert [int(out[x, y, 0]) for x, y in [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]] == [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
    ]
    assert out[2, 2, 0] == 0 and out[3, 3, 0] == 0
    item = SliceDataset(spec)[0]
    assert item["image"].max() == 0 and item["spacing"] == pytest.approx((0.7, 0.7))  # -1000 HU under [-125, 275]


def test_brats_whole_tumour_both_namings(tmp_path):
    seg = np.zeros((6, 6, 3), np.uint8)
    seg[1, 1], seg[2, 2], seg[3, 3] = 1, 2, 4
    save(tmp_path / "raw" / "BraTS_001" / "BraTS_001_flair.nii.gz", np.ones((6, 6, 3), np.float32))
    save(tmp_path / "raw" / "BraTS_001" / "BraTS_001_seg.nii.gz", seg)
    save(tmp_path / "raw" / "BraTS-GLI-00002-000" / "BraTS-GLI-00002-000-t2f.nii.gz", np.ones((6, 6, 3), np.float32))
    save(tmp_path / "raw" / "BraTS-GLI-00002-000" / "BraTS-GLI-00002-000-seg.nii.gz", seg)
    convert_brats(tmp_path / "raw", tmp_path / "msd")
    spec = load_dataset(tmp_path / "msd")
    assert [c.id for c in spec.cases] == ["BraTS-GLI-00002-000", "BraTS_001"] and spec.classes == {1: "whole tumour"}
    out = np.asanyarray(nib.load(str(tmp_path / "msd" / "labelsTr" / "BraTS_001.nii.gz")).dataobj)
    assert set(np.unique(out)) == {0, 1} and out.sum() == 3 * 3


def test_failed_conversion_leaves_nothing_and_output_must_be_new(tmp_path):
    save(tmp_path / "raw" / "img" / "img0001.nii.gz", np.zeros((4, 4, 2), np.float32))
    save(tmp_path / "raw" / "label" / "label0001.nii.gz", np.full((4, 4, 2), 0.5, np.float32))
    with pytest.raises(DataError, match=r"label0001\.nii\.gz: label holds non-integer values"):
        convert_synapse(tmp_path / "raw", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no half-written output, no temporary folder
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(FileExistsError, match="taken exists and is not empty"):
        convert_synapse(tmp_path / "raw", tmp_path / "taken")
    with pytest.raises(FileNotFoundError, match="no BraTS case folders"):
        convert_brats(tmp_path / "raw", tmp_path / "new")


def test_isic_pairs_become_a_2d_dataset(tmp_path, data_cli, capsys):
    from samadapt.cli import main

    src, gt = tmp_path / "ISIC_Input", tmp_path / "ISIC_GroundTruth"
    src.mkdir()
    gt.mkdir()
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(src / "ISIC_0001.jpg")
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 5:15] = 255
    Image.fromarray(mask).save(gt / "ISIC_0001_segmentation.png")
    argv = ["data", "convert", "isic", str(src), str(tmp_path / "out"), "--masks", str(gt)]
    assert data_cli(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2  # the output exists now: refused, in one line
    assert capsys.readouterr().err.strip() == f"samadapt data: error: {tmp_path / 'out'} exists and is not empty; " + (
        "choose a new output directory"
    )
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["labels"]["1"] == "lesion"
    item = SliceDataset(load_dataset(tmp_path / "out"))[0]
    assert item["image"].shape == (20, 30, 3) and item["label"].sum() == 50 and item["label"].max() == 1
