"""Converters from common public layouts into the MSD layout samadapt reads. All per-dataset code lives here.

- Synapse / BTCV: ``img/*.nii.gz`` + ``label/*.nii.gz`` (13 organs) -> SAMed's 8 organs, CT window preset
  ``ct_synapse`` ([-125, 275]).
- BraTS: one folder per case with ``*_flair.nii.gz`` and ``*_seg.nii.gz`` -> FLAIR image, whole tumour (seg > 0).
- ISIC-style 2D: ``images/*.jpg`` + masks ``*_segmentation.png`` (or ``masks/`` with the same stems) -> images/ + masks/
  with 0 / 1 masks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from samadapt.data.io import DataError

# SAMed's Synapse protocol: BTCV label -> class id (others: background)
SYNAPSE_LABEL_MAP = {1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6, 8: 7, 11: 8}
SYNAPSE_CLASSES = {
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    7: "aorta",
    8: "pancreas",
}


def _new_msd(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output directory")
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()


def _write_json(out: Path, meta: dict) -> None:
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))


def convert_synapse(src: str | Path, out: str | Path) -> Path:
    """BTCV / Synapse raw data -> MSD layout with the SAMed 8-organ label map."""
    src, out = Path(src), Path(out)
    images = sorted((src / "img").glob("*.nii.gz"))
    if not images:
        raise FileNotFoundError(f"{src / 'img'}: no *.nii.gz images (expected the Synapse / BTCV layout img/ + label/)")
    _new_msd(out)
    lookup = np.zeros(256, np.uint8)
    for old, new in SYNAPSE_LABEL_MAP.items():
        lookup[old] = new
    training = []
    for image in images:
        case = image.name[: -len(".nii.gz")]
        label_path = src / "label" / image.name.replace("img", "label")
        if not label_path.exists():
            raise FileNotFoundError(f"{image}: no label {label_path}")
        label = nib.load(str(label_path))
        values = np.asanyarray(label.dataobj)
        if values.min() < 0 or values.max() > 255:
            raise DataError(f"{label_path}: label values outside 0..255")
        mapped = nib.Nifti1Image(lookup[values.astype(np.int64)], label.affine, label.header)
        mapped.set_data_dtype(np.uint8)
        shutil.copyfile(image, out / "imagesTr" / f"{case}.nii.gz")
        nib.save(mapped, str(out / "labelsTr" / f"{case}.nii.gz"))
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    labels = {"0": "background", **{str(k): v for k, v in SYNAPSE_CLASSES.items()}}
    _write_json(
        out,
        {
            "name": "Synapse",
            "modality": {"0": "CT"},
            "labels": labels,
            "training": training,
            "samadapt": {"preprocessing": "ct_synapse", "axis": 0},
        },
    )
    return out


def convert_brats(src: str | Path, out: str | Path) -> Path:
    """BraTS case folders -> FLAIR images with whole-tumour labels (seg > 0)."""
    src, out = Path(src), Path(out)
    cases = sorted(p for p in src.iterdir() if p.is_dir() and any(p.glob("*_flair.nii*")))
    if not cases:
        raise FileNotFoundError(f"{src}: no BraTS case folders with *_flair.nii.gz")
    _new_msd(out)
    training = []
    for folder in cases:
        flair = next(folder.glob("*_flair.nii*"))
        seg = next(folder.glob("*_seg.nii*"), None)
        if seg is None:
            raise FileNotFoundError(f"{folder}: no *_seg.nii.gz next to {flair.name}")
        label = nib.load(str(seg))
        whole = nib.Nifti1Image((np.asanyarray(label.dataobj) > 0).astype(np.uint8), label.affine, label.header)
        whole.set_data_dtype(np.uint8)
        shutil.copyfile(flair, out / "imagesTr" / f"{folder.name}.nii.gz")
        nib.save(whole, str(out / "labelsTr" / f"{folder.name}.nii.gz"))
        training.append({"image": f"./imagesTr/{folder.name}.nii.gz", "label": f"./labelsTr/{folder.name}.nii.gz"})
    _write_json(
        out,
        {
            "name": "BraTS-FLAIR-WT",
            "modality": {"0": "FLAIR"},
            "labels": {"0": "background", "1": "whole tumour"},
            "training": training,
            "samadapt": {"preprocessing": "mr", "axis": 0},
        },
    )
    return out


def convert_isic(src: str | Path, out: str | Path) -> Path:
    """ISIC-style 2D pairs -> ``images/`` + ``masks/`` (0 / 1) with a dataset.json."""
    src, out = Path(src), Path(out)
    image_dir = src / "images" if (src / "images").is_dir() else src
    mask_dir = src / "masks" if (src / "masks").is_dir() else src
    pictures = sorted(
        p
        for p in image_dir.iterdir()
        if p.suffix.lower() in (".jpg", ".jpeg", ".png") and "_segmentation" not in p.stem
    )
    if not pictures:
        raise FileNotFoundError(f"{image_dir}: no .jpg / .png images")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output directory")
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    for picture in pictures:
        mask_path = next(
            (
                m
                for m in (mask_dir / f"{picture.stem}_segmentation.png", mask_dir / f"{picture.stem}.png")
                if m.exists() and m != picture
            ),
            None,
        )
        if mask_path is None:
            raise FileNotFoundError(f"{picture}: no mask {picture.stem}_segmentation.png in {mask_dir}")
        mask = np.asarray(Image.open(mask_path).convert("L")) > 127
        shutil.copyfile(picture, out / "images" / picture.name)
        Image.fromarray(mask.astype(np.uint8)).save(out / "masks" / f"{picture.stem}.png")
    _write_json(
        out, {"name": "ISIC", "labels": {"0": "background", "1": "lesion"}, "samadapt": {"preprocessing": "rgb"}}
    )
    return out


CONVERTERS = {"synapse": convert_synapse, "btcv": convert_synapse, "brats": convert_brats, "isic": convert_isic}
