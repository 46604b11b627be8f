"""Converters on tiny synthetic copies of each public layout."""

import json

import nibabel as nib
import numpy as np
from PIL import Image

from samadapt.cli import main
from samadapt.data import SliceDataset, load_dataset


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def test_synapse_label_map(tmp_path):
    src = tmp_path / "raw"
    label = np.zeros((8, 8, 4), np.uint8)
    label[0, 0, :] = 6  # liver -> 5
    label[1, 1, :] = 11  # pancreas -> 8
    label[2, 2, :] = 5  # esophagus -> background
    save(src / "img" / "img0001.nii.gz", np.zeros((8, 8, 4), np.float32))
    save(src / "label" / "label0001.nii.gz", label)
    assert main(["data", "convert", "synapse", str(src), str(tmp_path / "msd")]) == 0
    spec = load_dataset(tmp_path / "msd")
    assert spec.classes[5] == "liver" and spec.classes[8] == "pancreas" and spec.preprocessing == "ct_synapse"
    out = np.asanyarray(nib.load(str(tmp_path / "msd" / "labelsTr" / "img0001.nii.gz")).dataobj)
    assert out[0, 0, 0] == 5 and out[1, 1, 0] == 8 and out[2, 2, 0] == 0


def test_brats_whole_tumour(tmp_path):
    seg = np.zeros((6, 6, 3), np.uint8)
    seg[1, 1], seg[2, 2], seg[3, 3] = 1, 2, 4
    save(tmp_path / "raw" / "BraTS_001" / "BraTS_001_flair.nii.gz", np.ones((6, 6, 3), np.float32))
    save(tmp_path / "raw" / "BraTS_001" / "BraTS_001_seg.nii.gz", seg)
    assert main(["data", "convert", "brats", str(tmp_path / "raw"), str(tmp_path / "msd")]) == 0
    out = np.asanyarray(nib.load(str(tmp_path / "msd" / "labelsTr" / "BraTS_001.nii.gz")).dataobj)
    assert set(np.unique(out)) == {0, 1} and out.sum() == 3 * 3


def test_isic_pairs_become_a_2d_dataset(tmp_path):
    src = tmp_path / "isic"
    src.mkdir()
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(src / "ISIC_0001.jpg")
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 5:15] = 255
    Image.fromarray(mask).save(src / "ISIC_0001_segmentation.png")
    assert main(["data", "convert", "isic", str(src), str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["labels"]["1"] == "lesion"
    item = SliceDataset(load_dataset(tmp_path / "out"))[0]
    assert item["image"].shape == (20, 30, 3) and item["label"].sum() == 50
