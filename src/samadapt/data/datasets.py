"""Datasets on disk (MSD, nnU-Net v2, 2D folders) and a slice view over their volumes.

The Medical Segmentation Decathlon layout: ``dataset.json`` with ``training: [{image, label}]``, ``labels``
{"0": "background", ...} and ``modality``. nnU-Net v2: ``dataset.json`` with ``channel_names``, ``labels``
{name: id} and ``file_ending``, images ``imagesTr/CASE_0000<ending>``, labels ``labelsTr/CASE<ending>``.
2D folders: ``images/`` and ``masks/`` with matching file stems (mask > 0 is class 1 unless a dataset.json says more).
An optional ``"samadapt": {"preprocessing": PRESET, "axis": N}`` entry in dataset.json overrides the defaults.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samadapt.data.io import DataError, Volume, check_label_values, check_pair, read_volume, suffix_of
from samadapt.data.preprocess import SLICE_WISE, normalize, preset_for_modality

INDEX_VERSION = 1


@dataclass(frozen=True)
class Case:
    id: str
    image: Path
    label: Path | None


@dataclass
class DatasetSpec:
    """A dataset's cases, classes and preprocessing.

    Attributes:
        classes: foreground class id -> name (background 0 excluded).
        preprocessing: intensity preset (``samadapt.data.preprocess``).
        axis: slicing axis of the (Z, Y, X) arrays.
    """

    root: Path
    cases: list[Case]
    classes: dict[int, str]
    modality: str = "MRI"
    preprocessing: str = "mr"
    axis: int = 0
    test_images: list[Path] = field(default_factory=list)

    def case(self, case_id: str) -> Case:
        for case in self.cases:
            if case.id == case_id:
                return case
        raise KeyError(f"no case {case_id!r} in {self.root}")


def load_dataset(root: str | Path) -> DatasetSpec:
    """Read a dataset directory (MSD, nnU-Net v2, or images/ + masks/).

    Raises:
        FileNotFoundError: missing directory, dataset.json entry or file. DataError: malformed dataset.json.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset directory not found")
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        if (root / "images").is_dir() and (root / "masks").is_dir():
            return _folder_2d(root, {})
        raise FileNotFoundError(f"{root}: no dataset.json (MSD / nnU-Net layout) and no images/ + masks/ folders")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{meta_path}: not valid JSON ({error})") from error
    if "labels" not in meta:
        raise DataError(f"{meta_path}: no 'labels' entry")
    if (root / "images").is_dir() and not (root / "imagesTr").is_dir():
        return _folder_2d(root, meta)
    spec = _nnunet(root, meta, meta_path) if "channel_names" in meta else _msd(root, meta, meta_path)
    extra = meta.get("samadapt", {})
    spec.preprocessing = extra.get("preprocessing", spec.preprocessing)
    spec.axis = int(extra.get("axis", spec.axis))
    if not spec.cases:
        raise DataError(f"{meta_path}: the dataset lists no training cases")
    return spec


def _classes(labels: dict, meta_path: Path) -> dict[int, str]:
    classes = {}
    for key, value in labels.items():
        # MSD: {"1": "liver"}; nnU-Net v2: {"liver": 1} (regions as lists are not supported)
        name, ident = (value, key) if str(key).lstrip("-").isdigit() else (key, value)
        if not isinstance(ident, (int, str)) or not str(ident).isdigit():
            raise DataError(f"{meta_path}: label entry {key!r}: {value!r} is not a class id")
        if int(ident) != 0:
            classes[int(ident)] = str(name)
    return classes


def _msd(root: Path, meta: dict, meta_path: Path) -> DatasetSpec:
    cases = []
    for entry in meta.get("training", []):
        if "image" not in entry or "label" not in entry:
            raise DataError(f"{meta_path}: training entry {entry} needs 'image' and 'label'")
        image, label = root / entry["image"], root / entry["label"]
        for path in (image, label):
            if not path.exists():
                raise FileNotFoundError(f"{meta_path}: lists {path.relative_to(root)}, which does not exist")
        cases.append(Case(_case_id(image), image, label))
    modality = str(next(iter(meta.get("modality", {"0": "MRI"}).values())))
    tests = [root / (t if isinstance(t, str) else t["image"]) for t in meta.get("test", [])]
    return DatasetSpec(
        root, cases, _classes(meta["labels"], meta_path), modality, preset_for_modality(modality), 0, tests
    )


def _nnunet(root: Path, meta: dict, meta_path: Path) -> DatasetSpec:
    ending = meta.get("file_ending", ".nii.gz")
    cases = []
    for label in sorted((root / "labelsTr").glob(f"*{ending}")):
        case_id = label.name[: -len(ending)]
        image = root / "imagesTr" / f"{case_id}_0000{ending}"
        if not image.exists():
            raise FileNotFoundError(f"{meta_path}: label {label.name} has no image imagesTr/{image.name}")
        cases.append(Case(case_id, image, label))
    modality = str(next(iter(meta["channel_names"].values())))
    tests = sorted((root / "imagesTs").glob(f"*_0000{ending}"))
    return DatasetSpec(
        root, cases, _classes(meta["labels"], meta_path), modality, preset_for_modality(modality), 0, tests
    )


def _folder_2d(root: Path, meta: dict) -> DatasetSpec:
    masks = {p.stem: p for p in (root / "masks").iterdir() if p.is_file()}
    cases = []
    for image in sorted(p for p in (root / "images").iterdir() if p.is_file()):
        stem = image.stem
        mask = masks.get(stem) or masks.get(f"{stem}_segmentation") or masks.get(f"{stem}_mask")
        if mask is None:
            raise FileNotFoundError(f"{image}: no mask with the same name in {root / 'masks'}")
        cases.append(Case(stem, image, mask))
    classes = _classes(meta["labels"], root / "dataset.json") if meta else {1: "foreground"}
    preprocessing = meta.get("samadapt", {}).get("preprocessing", "rgb")
    return DatasetSpec(root, cases, classes, "RGB", preprocessing, 0)


def _case_id(path: Path) -> str:
    name = path.name
    return name[: -len(suffix_of(path))]


class SliceDataset:
    """2D slices of a dataset's volumes, with an index of the classes each slice holds.

    The index is cached in ``<root>/.samadapt/index-axis<N>.json`` and rebuilt only when a file's size or
    modification time changes. Volumes are read lazily and preprocessed once (a small LRU cache keeps the last few).

    Items are dicts: ``image`` float32 (H, W) or (H, W, 3) in [0, 1], ``label`` int64 (H, W), ``case``, ``slice``,
    ``spacing`` (row, column) in mm.
    """

    def __init__(self, spec: DatasetSpec, cases: list[str] | None = None, axis: int | None = None, cache_size: int = 4):
        self.spec = spec
        self.axis = spec.axis if axis is None else axis
        self.cases = [c for c in spec.cases if cases is None or c.id in cases]
        if cases is not None and len(self.cases) != len(set(cases)):
            missing = sorted(set(cases) - {c.id for c in self.cases})
            raise KeyError(f"{spec.root}: unknown cases {missing}")
        self._volumes: OrderedDict[str, tuple[np.ndarray, np.ndarray, tuple]] = OrderedDict()
        self._cache_size = cache_size
        index = self._load_index()
        self.slices: list[tuple[str, int, tuple[int, ...]]] = [
            (case.id, z, tuple(classes)) for case in self.cases for z, classes in enumerate(index[case.id])
        ]

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> dict:
        case_id, z, _ = self.slices[i]
        image, label, spacing = self._volume(case_id)
        image_slice = np.take(image, z, axis=self.axis)
        if self.spec.preprocessing in SLICE_WISE:
            image_slice = normalize(image_slice, self.spec.preprocessing)
        return {
            "image": image_slice,
            "label": np.take(label, z, axis=self.axis).astype(np.int64),
            "case": case_id,
            "slice": z,
            "spacing": tuple(s for k, s in enumerate(spacing) if k != self.axis),
        }

    def indices(self, classes: list[int] | None = None, cases: list[str] | None = None) -> list[int]:
        """Slices holding any of ``classes`` (all slices when None), optionally of some cases only."""
        wanted = set(classes) if classes is not None else None
        return [
            i
            for i, (case_id, _, present) in enumerate(self.slices)
            if (cases is None or case_id in cases) and (wanted is None or wanted & set(present))
        ]

    def read_case(self, case_id: str) -> tuple[Volume, Volume | None]:
        """The raw image and label volumes of a case (validated)."""
        case = self.spec.case(case_id)
        image = read_volume(case.image)
        if case.label is None:
            return image, None
        label = read_volume(case.label)
        check_pair(image, label)
        check_label_values(label, {0, *self.spec.classes})
        return image, label

    def _volume(self, case_id: str) -> tuple[np.ndarray, np.ndarray, tuple]:
        if case_id in self._volumes:
            self._volumes.move_to_end(case_id)
            return self._volumes[case_id]
        image, label = self.read_case(case_id)
        array = image.array
        if self.spec.preprocessing not in SLICE_WISE:
            array = normalize(array, self.spec.preprocessing)
        entry = (array, label.array, image.spacing)
        self._volumes[case_id] = entry
        while len(self._volumes) > self._cache_size:
            self._volumes.popitem(last=False)
        return entry

    def _load_index(self) -> dict[str, list[list[int]]]:
        path = self.spec.root / ".samadapt" / f"index-axis{self.axis}.json"
        stamps = {c.id: _stamp(c.label) for c in self.cases}
        cached = {}
        if path.exists():
            try:
                cached = json.loads(path.read_text())
            except json.JSONDecodeError:
                cached = {}
        if cached.get("version") != INDEX_VERSION:
            cached = {"version": INDEX_VERSION, "cases": {}}
        entries = cached["cases"]
        changed = False
        for case in self.cases:
            entry = entries.get(case.id)
            if entry is None or entry["stamp"] != stamps[case.id]:
                _, label = self.read_case(case.id)
                moved = np.moveaxis(label.array, self.axis, 0)
                entries[case.id] = {"stamp": stamps[case.id], "slices": [np.unique(s[s > 0]).tolist() for s in moved]}
                changed = True
        if changed:
            try:
                path.parent.mkdir(exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(cached))
                os.replace(tmp, path)
            except OSError:  # a read-only dataset still works, it just re-indexes next time
                pass
        return {case.id: entries[case.id]["slices"] for case in self.cases}


def _stamp(path: Path | None) -> list:
    if path is None:
        return []
    stat = path.stat()
    return [stat.st_size, int(stat.st_mtime_ns)]


def split_cases(spec: DatasetSpec, val_cases: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Hold out ``val_cases`` cases (seeded); with a single case nothing is held out."""
    ids = [c.id for c in spec.cases]
    if len(ids) <= 1 or val_cases <= 0:
        return ids, []
    order = np.random.default_rng(seed).permutation(len(ids))
    held = {ids[i] for i in order[:val_cases]}
    return [i for i in ids if i not in held], [i for i in ids if i in held]
