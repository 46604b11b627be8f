"""Converters from common public layouts into the layouts samadapt reads. All per-dataset code lives here.

- Synapse / BTCV: ``img/*.nii.gz`` + ``label/*.nii.gz`` (13 organs) -> MSD with SAMed's 8 organs and the CT window
  preset ``ct_synapse`` ([-125, 275]).
- BraTS: one folder per case with ``*_flair.nii.gz`` and ``*_seg.nii.gz`` (BraTS 2023: ``*-t2f`` / ``*-seg``) ->
  MSD with the FLAIR image and the whole tumour (seg > 0).
- DICOM: a folder of series (a PACS export) -> MSD, one case per image series, labels from the SEG / RTSTRUCT
  objects that reference it, and ``dicom_mapping.json`` from each case back to its series.
- ISIC-style 2D: images ``*.jpg`` with masks ``*_segmentation.png`` (in the same folder, in ``masks/``, or in a
  separate mask folder) -> ``images/`` + ``masks/`` with 0 / 1 masks and a dataset.json.

Each converter writes into a temporary sibling of the output directory and renames it at the end, so a failed
conversion leaves nothing half-written behind.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from samadapt.data.dataset_writer import write_msd_dataset
from samadapt.errors import DataError, InputNotFoundError, OutputExistsError
from samadapt.files import atomic_folder, atomic_write_text

# SAMed's Synapse protocol: BTCV label -> class id (the other organs become background)
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


def _convert(out: str | Path, fill: Callable[[Path], None]) -> Path:
    """Run ``fill(tmp_dir)`` and move the result to ``out`` (which must not exist or be empty)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} exists and is not empty; choose a new output directory")
    with atomic_folder(out) as tmp:
        fill(tmp)
    return out


def _integer_labels(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    label = nib.load(str(path))
    values = np.asanyarray(label.dataobj)
    if values.dtype.kind == "f" and not np.all(np.mod(values, 1) == 0):
        raise DataError(f"{path}: label holds non-integer values")
    return values.astype(np.int64), label


def convert_synapse(src: str | Path, out: str | Path) -> Path:
    """BTCV / Synapse raw data (``img/imgNNNN.nii.gz``, ``label/labelNNNN.nii.gz``) -> MSD with SAMed's 8 organs."""
    src = Path(src)
    images = sorted((src / "img").glob("*.nii.gz"))
    if not images:
        raise InputNotFoundError(
            f"{src / 'img'}: no *.nii.gz images (expected the Synapse / BTCV layout img/ + label/)"
        )
    lookup = np.zeros(max(SYNAPSE_LABEL_MAP) + 1, np.uint8)
    for old, new in SYNAPSE_LABEL_MAP.items():
        lookup[old] = new

    def fill(tmp: Path) -> None:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        training = []
        for image in images:
            case = image.name[: -len(".nii.gz")]
            candidates = [src / "label" / image.name.replace("img", "label", 1), src / "label" / image.name]
            label_path = next((p for p in candidates if p.exists()), None)
            if label_path is None:
                raise InputNotFoundError(f"{image}: no label {candidates[0]}")
            values, label = _integer_labels(label_path)
            if values.min() < 0 or values.max() > 255:
                raise DataError(f"{label_path}: label values outside 0..255")
            kept = np.where(values < len(lookup), lookup[np.minimum(values, len(lookup) - 1)], 0).astype(np.uint8)
            mapped = nib.Nifti1Image(kept, label.affine, label.header)
            mapped.set_data_dtype(np.uint8)
            mapped.header.set_slope_inter(1.0, 0.0)
            shutil.copyfile(image, tmp / "imagesTr" / f"{case}.nii.gz")
            nib.save(mapped, str(tmp / "labelsTr" / f"{case}.nii.gz"))
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        write_msd_dataset(
            tmp,
            training,
            SYNAPSE_CLASSES,
            "CT",
            "ct_synapse",
            name="Synapse",
            description="BTCV abdomen CT, SAMed's 8 organs (BTCV labels 1, 2, 3, 4, 6, 7, 8, 11)",
        )

    return _convert(out, fill)


def _first(folder: Path, patterns: tuple[str, ...]) -> Path | None:
    return next((p for pattern in patterns for p in sorted(folder.glob(pattern))), None)


_FLAIR = ("*_flair.nii.gz", "*_flair.nii", "*-t2f.nii.gz", "*-t2f.nii")
_SEG = ("*_seg.nii.gz", "*_seg.nii", "*-seg.nii.gz", "*-seg.nii")


def convert_brats(src: str | Path, out: str | Path) -> Path:
    """BraTS case folders -> MSD with FLAIR images and whole-tumour labels (seg > 0)."""
    src = Path(src)
    cases = sorted(p for p in src.iterdir() if p.is_dir() and _first(p, _FLAIR)) if src.is_dir() else []
    if not cases:
        raise InputNotFoundError(f"{src}: no BraTS case folders with *_flair.nii.gz (or *-t2f.nii.gz)")

    def fill(tmp: Path) -> None:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        training = []
        for folder in cases:
            flair, seg = _first(folder, _FLAIR), _first(folder, _SEG)
            if seg is None:
                raise InputNotFoundError(f"{folder}: no *_seg.nii.gz next to {flair.name}")
            values, label = _integer_labels(seg)
            if values.shape != nib.load(str(flair)).shape:
                raise DataError(f"{seg}: shape {values.shape} differs from {flair.name}")
            whole = nib.Nifti1Image((values > 0).astype(np.uint8), label.affine, label.header)
            whole.set_data_dtype(np.uint8)
            whole.header.set_slope_inter(1.0, 0.0)
            suffix = ".nii.gz" if flair.name.endswith(".gz") else ".nii"
            shutil.copyfile(flair, tmp / "imagesTr" / f"{folder.name}{suffix}")
            nib.save(whole, str(tmp / "labelsTr" / f"{folder.name}.nii.gz"))
            training.append({"image": f"./imagesTr/{folder.name}{suffix}", "label": f"./labelsTr/{folder.name}.nii.gz"})
        write_msd_dataset(
            tmp,
            training,
            {1: "whole tumour"},
            "FLAIR",
            "mr",
            name="BraTS-FLAIR-WT",
            description="BraTS FLAIR, whole tumour (all tumour labels merged)",
        )

    return _convert(out, fill)


def convert_isic(src: str | Path, out: str | Path, masks: str | Path | None = None) -> Path:
    """ISIC-style 2D pairs -> ``images/`` + ``masks/`` (0 / 1 PNG) with a dataset.json.

    Args:
        src: a folder of images (with the masks beside them), or one holding ``images/`` and ``masks/``.
        masks: a separate mask folder (ISIC's ``..._GroundTruth``), if the masks are not found under ``src``.
    """
    src = Path(src)
    image_dir = src / "images" if (src / "images").is_dir() else src
    mask_dir = Path(masks) if masks is not None else src / "masks" if (src / "masks").is_dir() else image_dir
    if not image_dir.is_dir():
        raise InputNotFoundError(f"{image_dir}: no such folder")
    pictures = sorted(
        p
        for p in image_dir.iterdir()
        if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp") and not p.stem.endswith(("_segmentation", "_mask"))
    )
    if not pictures:
        raise InputNotFoundError(f"{image_dir}: no .jpg / .png images")

    def fill(tmp: Path) -> None:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for picture in pictures:
            names = (f"{picture.stem}_segmentation.png", f"{picture.stem}_mask.png", f"{picture.stem}.png")
            mask_path = next((mask_dir / n for n in names if (mask_dir / n).exists() and mask_dir / n != picture), None)
            if mask_path is None:
                raise InputNotFoundError(f"{picture}: no mask {picture.stem}_segmentation.png in {mask_dir}")
            with Image.open(mask_path) as mask_image:
                mask = np.asarray(mask_image.convert("L")) > 127
            with Image.open(picture) as image:
                if image.size != (mask.shape[1], mask.shape[0]):
                    raise DataError(f"{mask_path}: mask size {mask.shape[::-1]} differs from image size {image.size}")
            shutil.copyfile(picture, tmp / "images" / picture.name)
            Image.fromarray(mask.astype(np.uint8)).save(tmp / "masks" / f"{picture.stem}.png")
        write_msd_dataset(
            tmp,
            [],
            {1: "lesion"},
            "RGB",
            "rgb",
            axis=None,
            name="ISIC",
            description="dermoscopy lesions, masks thresholded at 128",
            layout="folders",
        )

    return _convert(out, fill)


CONVERTERS: dict[str, Callable[..., Path]] = {
    "synapse": convert_synapse,
    "btcv": convert_synapse,
    "brats": convert_brats,
    "isic": convert_isic,
}


def convert_dicom(src: str | Path, out: str | Path, series: Sequence[str] = ()) -> Path:
    """A DICOM folder (a PACS export: image series, SEG and RTSTRUCT objects) -> MSD, one case per image series.

    A series that a SEG or an RTSTRUCT in the folder references becomes a labelled case (``imagesTr`` +
    ``labelsTr``; classes by segment / ROI name, numbered in order of appearance), any other an unlabelled one
    (``imagesTs``). ``dicom_mapping.json`` maps each case back to its series (UIDs, orientation, label sources).

    Args:
        series: SeriesInstanceUIDs to convert (default: every image series).

    Raises:
        InputNotFoundError: no image series. DataError: an unknown UID, or a series no grid holds (``data.dicom``).
    """
    from samadapt.data.dicom import list_series, read_series
    from samadapt.data.dicom_out import read_dicom_labels, referenced_series
    from samadapt.data.io import write_label
    from samadapt.data.preprocess import preset_for_modality

    src = Path(src)
    every = list_series(src)
    images = [s for s in every if s.image]
    if not images:
        raise InputNotFoundError(f"{src}: no DICOM image series")
    unknown = sorted(set(series) - {s.series_uid for s in images})
    if unknown:
        listing = "; ".join(s.describe() for s in every)
        raise DataError(f"{src}: no image series {', '.join(unknown)}; the folder holds: {listing}")
    chosen = [s for s in images if not series or s.series_uid in series]
    sources: dict[str, list[Path]] = {}
    for other in every:
        for path in other.files if other.modality in ("SEG", "RTSTRUCT") else ():
            for uid in referenced_series(path):
                sources.setdefault(uid, []).append(path)

    def fill(tmp: Path) -> None:
        names: dict[str, int] = {}
        training, test, mapping, used = [], [], {}, set()
        for item in chosen:
            case = _case_name(item, used)
            volume = read_series(src, item.series_uid)
            found = sources.get(item.series_uid, [])
            part = "imagesTr" if found else "imagesTs"
            (tmp / part).mkdir(exist_ok=True)
            nib.save(
                nib.Nifti1Image(volume.array.transpose(2, 1, 0), volume.affine), str(tmp / part / f"{case}.nii.gz")
            )
            if found:
                labels = np.zeros(volume.array.shape[:3], np.uint16)
                for path in found:
                    values, segments = read_dicom_labels(path, volume)
                    for value, name in segments.items():
                        labels[values == value] = names.setdefault(name, len(names) + 1)
                write_label(volume, labels, tmp / "labelsTr" / f"{case}.nii.gz")
                training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
            else:
                test.append(f"./imagesTs/{case}.nii.gz")
            sources_of = [str(p.relative_to(src)) for p in found]
            mapping[case] = {**item.record(), "folder": str(src.resolve()), "labels_from": sources_of}
        modality = {"CT": "CT", "MR": "MRI"}.get(chosen[0].modality, chosen[0].modality or "MRI")
        write_msd_dataset(
            tmp,
            training,
            {value: name for name, value in names.items()},
            modality,
            preset_for_modality(modality),
            name=src.name,
            description=f"converted from the DICOM series of {src} (dicom_mapping.json maps cases back)",
            test=test,
        )
        atomic_write_text(tmp / "dicom_mapping.json", json.dumps(mapping, indent=2))

    return _convert(out, fill)


def _case_name(series, used: set[str]) -> str:
    """A file-safe case id from the patient ID and series number, unique within the conversion."""
    base = re.sub(r"[^A-Za-z0-9.-]+", "-", f"{series.patient_id or 'case'}_s{series.number or 0}").strip("-")
    name, k = base, 1
    while name in used:
        k += 1
        name = f"{base}-{k}"
    used.add(name)
    return name
