"""Datasets on disk (MSD, nnU-Net v2, 2D folders) and a slice view over their volumes (written by
``data.dataset_writer.write_msd_dataset``).

The Medical Segmentation Decathlon layout: ``dataset.json`` with ``training: [{image, label}]``, ``labels``
{"0": "background", ...} and ``modality``. nnU-Net v2: ``dataset.json`` with ``channel_names``, ``labels``
{name: id} and ``file_ending``, images ``imagesTr/CASE_0000<ending>`` (only channel 0 is read), labels
``labelsTr/CASE<ending>``. 2D folders: ``images/`` and ``masks/`` with matching file stems (a mask may also be named
``STEM_segmentation`` or ``STEM_mask``); without a dataset.json any mask value > 0 is class 1 ("foreground").
An optional ``"samadapt": {"preprocessing": PRESET, "axis": N}`` entry in dataset.json overrides the defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samadapt.data.io import (
    PICTURES,
    Volume,
    cache_root,
    check_label_values,
    check_pair,
    read_label,
    read_volume,
    suffix_of,
)
from samadapt.data.position import slice_position
from samadapt.data.preprocess import PRESETS, preprocess_volume, preset_for_modality, volume_slice
from samadapt.errors import ConfigError, DataError, InputNotFoundError
from samadapt.files import atomic_write, atomic_write_text

INDEX_VERSION = 2
CACHE_VERSION = 1  # of the preprocessed-volume cache: bump when preprocessing changes its output


@dataclass(frozen=True)
class Case:
    """One case: ``id``, ``image`` path, ``label`` path (None for an unlabelled case)."""

    id: str
    image: Path
    label: Path | None


@dataclass
class DatasetSpec:
    """A dataset's cases, classes and preprocessing.

    Attributes:
        root: the dataset directory.
        cases: the labelled cases, in dataset.json order (nnU-Net and folders: sorted by name).
        classes: foreground class id -> name (background 0 excluded).
        modality: the modality of dataset.json (first channel), used to pick ``preprocessing``.
        preprocessing: intensity preset name (``samadapt.data.preprocess``).
        axis: default slicing axis of the (Z, Y, X) arrays.
        binarize: labels are read as ``label > 0`` (plain 2D folders without dataset.json, 0 / 255 masks).
        test_images: unlabelled test images (``test`` / ``imagesTs``).
        meta: the whole dataset.json (extra keys such as per-case modality live here).
    """

    root: Path
    cases: list[Case]
    classes: dict[int, str]
    modality: str = "MRI"
    preprocessing: str = "mr"
    axis: int = 0
    binarize: bool = False
    test_images: list[Path] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def case(self, case_id: str) -> Case:
        for case in self.cases:
            if case.id == case_id:
                return case
        raise KeyError(f"no case {case_id!r} in {self.root}")


def load_dataset(root: str | Path) -> DatasetSpec:
    """Read a dataset directory (MSD, nnU-Net v2, or images/ + masks/).

    Raises:
        FileNotFoundError: missing directory, dataset.json entry or file. DataError: malformed dataset.json, no cases.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputNotFoundError(f"{root}: dataset directory not found")
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        if (root / "images").is_dir() and (root / "masks").is_dir():
            spec = _folder_2d(root, {})
        else:
            raise InputNotFoundError(f"{root}: no dataset.json (MSD / nnU-Net layout) and no images/ + masks/ folders")
    else:
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as error:
            raise DataError(f"{meta_path}: not valid JSON ({error})") from error
        if not isinstance(meta, dict) or "labels" not in meta:
            raise DataError(f"{meta_path}: no 'labels' entry")
        if (root / "images").is_dir() and not (root / "imagesTr").is_dir():
            spec = _folder_2d(root, meta)
        elif "channel_names" in meta:
            spec = _nnunet(root, meta, meta_path)
        else:
            spec = _msd(root, meta, meta_path)
        spec.meta = meta
        extra = meta.get("samadapt", {})
        spec.preprocessing = extra.get("preprocessing", spec.preprocessing)
        spec.axis = int(extra.get("axis", spec.axis))
    if spec.preprocessing not in PRESETS:
        raise DataError(f"{meta_path}: unknown preprocessing {spec.preprocessing!r}; choose one of {PRESETS}")
    if spec.axis not in (0, 1, 2):
        raise DataError(f"{meta_path}: slicing axis must be 0, 1 or 2, got {spec.axis}")
    if not spec.cases:
        raise DataError(f"{root}: the dataset holds no labelled training cases")
    return spec


def _classes(labels: dict, meta_path: Path) -> dict[int, str]:
    classes = {}
    for key, value in labels.items():
        # MSD: {"1": "liver"}; nnU-Net v2: {"liver": 1} (regions given as lists are not supported)
        name, ident = (value, key) if str(key).lstrip("-").isdigit() else (key, value)
        if isinstance(ident, bool) or not isinstance(ident, (int, str)) or not str(ident).isdigit():
            raise DataError(f"{meta_path}: label entry {key!r}: {value!r} is not a class id")
        if int(ident) != 0:
            classes[int(ident)] = str(name)
    return classes


def _msd(root: Path, meta: dict, meta_path: Path) -> DatasetSpec:
    cases = []
    for entry in meta.get("training", []):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f"{meta_path}: training entry {entry} needs 'image' and 'label'")
        image, label = root / entry["image"], root / entry["label"]
        for path in (image, label):
            if not path.exists():
                raise InputNotFoundError(f"{meta_path}: lists {path.relative_to(root)}, which does not exist")
        cases.append(Case(_case_id(image), image, label))
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        raise DataError(f"{meta_path}: image names repeat; case ids must be unique")
    modality = str(next(iter(meta.get("modality", {"0": "MRI"}).values())))
    tests = [root / (t if isinstance(t, str) else t["image"]) for t in meta.get("test", [])]
    classes = _classes(meta["labels"], meta_path)
    return DatasetSpec(root, cases, classes, modality, preset_for_modality(modality), test_images=tests)


def _nnunet(root: Path, meta: dict, meta_path: Path) -> DatasetSpec:
    ending = meta.get("file_ending", ".nii.gz")
    cases = []
    for label in sorted((root / "labelsTr").glob(f"*{ending}")):
        case_id = label.name[: -len(ending)]
        image = root / "imagesTr" / f"{case_id}_0000{ending}"
        if not image.exists():
            raise InputNotFoundError(f"{meta_path}: label labelsTr/{label.name} has no image imagesTr/{image.name}")
        cases.append(Case(case_id, image, label))
    expected = meta.get("numTraining")
    if expected is not None and int(expected) != len(cases):
        raise DataError(f"{meta_path}: numTraining is {expected}, but labelsTr holds {len(cases)} '*{ending}' labels")
    modality = str(next(iter(meta["channel_names"].values())))
    tests = sorted((root / "imagesTs").glob(f"*_0000{ending}"))
    classes = _classes(meta["labels"], meta_path)
    return DatasetSpec(root, cases, classes, modality, preset_for_modality(modality), test_images=tests)


def _folder_2d(root: Path, meta: dict) -> DatasetSpec:
    masks = {p.stem: p for p in (root / "masks").iterdir() if p.is_file() and suffix_of(p) in PICTURES}
    cases = []
    for image in sorted(p for p in (root / "images").iterdir() if p.is_file() and suffix_of(p) in PICTURES):
        stem = image.stem
        mask = masks.get(stem) or masks.get(f"{stem}_segmentation") or masks.get(f"{stem}_mask")
        if mask is None:
            raise InputNotFoundError(f"{image}: no mask with the same name in {root / 'masks'}")
        cases.append(Case(stem, image, mask))
    if meta:
        classes = _classes(meta["labels"], root / "dataset.json")
        preprocessing = meta.get("samadapt", {}).get("preprocessing", "rgb")
        return DatasetSpec(root, cases, classes, "RGB", preprocessing)
    return DatasetSpec(root, cases, {1: "foreground"}, "RGB", "rgb", binarize=True)


def _case_id(path: Path) -> str:
    return path.name[: -len(suffix_of(path))]


class SliceDataset:
    """2D slices of a dataset's volumes, with an index of the classes (and their pixel counts) each slice holds.

    The index is cached as JSON in ``<root>/.samadapt/`` (or, for a read-only dataset, under
    ``$SAMADAPT_CACHE/index/``) and rebuilt per case only when its label file's path, size or modification time
    changes, so a second run reads no volume. Building it validates every case (shapes, spacing, label values).
    Volumes are read lazily and preprocessed once: with ``mmap_cache`` (the default) the preprocessed image and the
    label of each case are written once as ``.npy`` files next to the index (as nnU-Net's preprocessing does) and
    read back memory-mapped, so memory does not grow with the number of cases and DataLoader workers share the
    operating system's page cache; a small LRU keeps the last ``cache_size`` volumes open.

    Items are dicts: ``image`` float32 (H, W) or (H, W, 3) in [0, 1], ``label`` int64 (H, W), ``case``, ``slice``,
    ``position`` (where the slice lies along the axis, in [0, 1]: ``data.position.slice_position``), ``spacing``
    (row, column) in mm. ``slices[i]`` is (case id, slice position, classes present).
    """

    def __init__(
        self,
        spec: DatasetSpec,
        cases: list[str] | None = None,
        axis: int | None = None,
        cache_size: int = 4,
        mmap_cache: bool = True,
    ):
        self.spec = spec
        self.axis = spec.axis if axis is None else int(axis)
        if self.axis not in (0, 1, 2):
            raise ConfigError(f"slicing axis must be 0, 1 or 2, got {self.axis}")
        known = {c.id for c in spec.cases}
        if cases is not None and set(cases) - known:
            raise DataError(f"{spec.root}: unknown cases {sorted(set(cases) - known)}")
        self.cases = [c for c in spec.cases if cases is None or c.id in cases]
        if not self.cases:
            raise DataError(f"{spec.root}: no cases selected")
        self._volumes: OrderedDict[str, tuple[np.ndarray, np.ndarray, tuple]] = OrderedDict()
        self._cache_size = max(1, cache_size)
        self._mmap_cache = mmap_cache
        self._case_by_id = {c.id: c for c in self.cases}
        index = self._load_index()
        self.slices: list[tuple[str, int, tuple[int, ...]]] = []
        self.areas: list[dict[int, int]] = []  # pixels of each class per slice
        self.depths = {case.id: len(index[case.id]) for case in self.cases}  # slices of each case along the axis
        for case in self.cases:
            for z, counts in enumerate(index[case.id]):
                self.slices.append((case.id, z, tuple(c for c, _ in counts)))
                self.areas.append(dict(counts))

    def __len__(self) -> int:
        return len(self.slices)

    def __getstate__(self) -> dict:
        # sent to DataLoader workers: open volumes stay behind (each worker maps its own)
        return {**self.__dict__, "_volumes": OrderedDict()}

    def __getitem__(self, i: int) -> dict:
        case_id, z, _ = self.slices[i]
        image, label, spacing = self._volume(case_id)
        plane = volume_slice(image, z, self.axis, self.spec.preprocessing)
        return {
            "image": plane,
            # an unlabelled case (label None: ``unlabelled_view``) reads as all background
            "label": np.zeros(plane.shape[:2], np.int64)
            if label is None
            else np.take(label, z, axis=self.axis).astype(np.int64),
            "case": case_id,
            "slice": z,
            "position": slice_position(z, self.depths[case_id]),
            "spacing": tuple(s for k, s in enumerate(spacing) if k != self.axis),
        }

    def subset(self, indices: Sequence[int]) -> SliceSubset:
        """A lazy view of some slices: items are read when asked for, their classes come from the index."""
        return SliceSubset(self, list(indices))

    def indices(
        self,
        classes: list[int] | None = None,
        cases: list[str] | None = None,
        min_pixels: int = 1,
        require: bool = False,
    ) -> list[int]:
        """Positions of the slices holding at least ``min_pixels`` of any of ``classes`` (None: every slice),
        optionally of some cases only.

        Raises:
            DataError: a class id the dataset does not define; with ``require``, when no slice matches.
        """
        if classes is not None:
            unknown = sorted(set(classes) - set(self.spec.classes))
            if unknown:
                raise DataError(f"{self.spec.root}: classes {unknown} are not in the dataset ({self.spec.classes})")
        wanted = set(classes) if classes is not None else None
        case_set = set(cases) if cases is not None else None  # a set: O(1) per slice, not O(cases)
        found = [
            i
            for i, ((case_id, _, _), areas) in enumerate(zip(self.slices, self.areas, strict=True))
            if (case_set is None or case_id in case_set)
            and (wanted is None or any(areas.get(c, 0) >= min_pixels for c in wanted))
        ]
        if require and not found:
            where = f" of cases {list(cases)}" if cases is not None else ""
            raise DataError(f"{self.spec.root}: no slice{where} along axis {self.axis} holds classes {classes}")
        return found

    def read_case(self, case_id: str) -> tuple[Volume, Volume | None]:
        """The raw image and label volumes of a case, validated (same grid, label values among the classes).

        Raises:
            DataError: naming the file and the problem.
        """
        case = self.spec.case(case_id)
        image = read_volume(case.image)
        if case.label is None:
            return image, None
        label = read_label(case.label)
        if self.spec.binarize:
            label.array = (label.array > 0).astype(np.uint8)
        check_pair(image, label)
        check_label_values(label, {0, *self.spec.classes})
        return image, label

    def _volume(self, case_id: str) -> tuple[np.ndarray, np.ndarray, tuple]:
        if case_id in self._volumes:
            self._volumes.move_to_end(case_id)
            return self._volumes[case_id]
        entry = self._preprocessed_case(case_id) if self._mmap_cache else None
        if entry is None:
            image, label = self.read_case(case_id)
            labels = None if label is None else label.array
            entry = (preprocess_volume(image.array, self.spec.preprocessing), labels, image.spacing)
        self._volumes[case_id] = entry
        while len(self._volumes) > self._cache_size:
            self._volumes.popitem(last=False)
        return entry

    def _preprocessed_case(self, case_id: str) -> tuple[np.ndarray, np.ndarray, tuple] | None:
        """The case's preprocessed image and its label, memory-mapped from the cache (written on first use);
        None where no cache can be written (a read-only dataset and cache folder)."""
        case = self._case_by_id[case_id]
        key = [CACHE_VERSION, _stamp(case.image, self.spec.root), _stamp(case.label, self.spec.root)]
        key += [self.spec.preprocessing, self.spec.binarize]
        digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]
        folder = self._index_path().parent / "preprocessed"
        parts = ("image", "label", "spacing") if case.label is not None else ("image", "spacing")
        paths = [folder / f"{case_id}-{digest}.{part}.npy" for part in parts]
        if not all(p.exists() for p in paths):
            image, label = self.read_case(case_id)
            arrays = [preprocess_volume(image.array, self.spec.preprocessing), np.array(image.spacing)]
            if label is not None:
                arrays.insert(1, label.array)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                for path, array in zip(paths, arrays, strict=True):
                    atomic_write(path, lambda tmp, a=array: _save_npy(tmp, a))  # readers never see half a file
            except OSError:
                return arrays[0], arrays[1] if label is not None else None, tuple(float(s) for s in arrays[-1])
        loaded = [np.load(p, mmap_mode="r") for p in paths]
        label = loaded[1] if case.label is not None else None
        return loaded[0], label, tuple(float(s) for s in loaded[-1])

    def _index_path(self) -> Path:
        name = f"index-axis{self.axis}.json"
        local = self.spec.root / ".samadapt"
        if os.access(local if local.exists() else self.spec.root, os.W_OK):
            return local / name
        digest = hashlib.sha1(str(self.spec.root.resolve()).encode()).hexdigest()[:16]
        return cache_root() / "index" / digest / name

    def _load_index(self) -> dict[str, list[list[list[int]]]]:
        path = self._index_path()
        cached: dict = {}
        if path.exists():
            try:
                cached = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                cached = {}
        settings = {"version": INDEX_VERSION, "binarize": self.spec.binarize}
        if not isinstance(cached, dict) or cached.get("settings") != settings:
            cached = {"settings": settings, "cases": {}}
        entries = cached["cases"]
        changed = False
        for case in self.cases:
            stamp = _stamp(case.label or case.image, self.spec.root)
            entry = entries.get(_index_key(case))
            if entry is None or entry.get("stamp") != stamp:
                image, label = self.read_case(case.id)
                if label is None:  # unlabelled: only the number of slices along the axis
                    entries[_index_key(case)] = {"stamp": stamp, "slices": [[]] * image.array.shape[self.axis]}
                else:
                    moved = np.moveaxis(label.array, self.axis, 0)
                    entries[case.id] = {"stamp": stamp, "slices": [_class_counts(s) for s in moved]}
                changed = True
        if changed:
            _write_index(path, cached)
        return {case.id: entries[_index_key(case)]["slices"] for case in self.cases}


@dataclass(frozen=True)
class SliceInfo:
    """What sampling needs to know of a slice without reading it: its case, position and classes."""

    case: str
    index: int
    classes: tuple[int, ...]


class SliceSubset(Sequence):
    """Some slices of a ``SliceDataset``, read on demand (``items[k]`` is ``slices[indices[k]]``)."""

    def __init__(self, slices: SliceDataset, indices: list[int]) -> None:
        self.slices = slices
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        return self.slices[self.indices[k]]

    def info(self, k: int) -> SliceInfo:
        case_id, z, classes = self.slices.slices[self.indices[k]]
        return SliceInfo(case_id, z, tuple(classes))


def _index_key(case: Case) -> str:
    # an unlabelled view of a labelled case keeps its own entry, so the two views never evict each other
    return case.id if case.label is not None else f"{case.id}#image"


def unlabelled_view(spec: DatasetSpec, test_images: bool = True) -> DatasetSpec:
    """The same dataset with every label ignored: its training cases (labels dropped) and, with ``test_images``, its
    unlabelled test images (``imagesTs`` / ``test``) as cases, for self-supervised pre-training.

    Raises:
        DataError: a test image whose case id repeats a training case's.
    """
    cases = [Case(c.id, c.image, None) for c in spec.cases]
    if test_images:
        known = {c.id for c in cases}
        for image in spec.test_images:
            if not image.exists():
                raise InputNotFoundError(f"{spec.root}: lists test image {image}, which does not exist")
            case_id = _case_id(image)
            if case_id in known:
                raise DataError(f"{spec.root}: test image {image.name} has the case id of a training case")
            known.add(case_id)
            cases.append(Case(case_id, image, None))
    return dataclasses.replace(spec, cases=cases)


def _class_counts(plane: np.ndarray) -> list[list[int]]:
    values, counts = np.unique(plane[plane > 0], return_counts=True)
    return [[int(v), int(n)] for v, n in zip(values, counts, strict=True)]


def _stamp(path: Path | None, root: Path) -> list:
    if path is None:
        return []
    stat = path.stat()
    return [os.path.relpath(path, root), stat.st_size, int(stat.st_mtime_ns)]


def _write_index(path: Path, content: dict) -> None:
    """Written atomically, so two processes never see half an index; a read-only place just means no cache."""
    with contextlib.suppress(OSError):
        atomic_write_text(path, json.dumps(content))


def _save_npy(path: Path, array) -> None:
    with path.open("wb") as handle:  # a handle: given a name, numpy would append ".npy"
        np.save(handle, np.asarray(array))
