"""State of the app: a ``Workspace`` (the model, the allowed folders, the open cases) and one ``Session`` per case
(``serve.case``).

Conventions: a case is a (Z, Y, X) volume; a slice is taken along ``axis`` (0, 1 or 2) at ``index`` with
``data.preprocess.volume_slice`` (exactly the slice training used) and shown as its (rows, cols) plane; prompts are
(x, y) = (col, row) pixels of that plane. Labels live on the case's grid, one integer class id per voxel, as the
saved file holds them.

Safety: a path is opened only when it resolves (symlinks followed) inside one of the readable folders (``--root``
and the demo cache) and written only inside a writable one (``--root`` and the labels folder); anything else is a
``PermissionError``. Every edit marks its session dirty; a background thread writes dirty sessions to the autosave
folder (atomic renames), so a closed tab or a killed server loses at most the last half second.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from samadapt.components import check_keep_components
from samadapt.data.datasets import load_dataset
from samadapt.data.dicom_out import label_format, write_dicom_labels
from samadapt.data.io import ITK, NIFTI, NPZ, PICTURES, read_volume, suffix_of, write_label
from samadapt.data.position import slice_position
from samadapt.data.preprocess import PRESETS, preprocess_volume
from samadapt.errors import DataError, InputNotFoundError
from samadapt.files import atomic_write
from samadapt.interactive import MARGIN, edit_box
from samadapt.prediction import SegmentationPredictor
from samadapt.prompts import Click, box_from_mask
from samadapt.runs import algorithm_of
from samadapt.serve.case import Session
from samadapt.serve.dicom_cases import dicom_cases, split_case_path

READABLE = (*NIFTI, *ITK, *PICTURES, *NPZ, ".dcm")
MAX_LISTED = 500
AUTOSAVE_PERIOD_S = 0.5
MAX_SESSIONS = 8  # open cases kept in memory; the oldest is written to its autosave and dropped
EMBEDDINGS_KEPT = 64  # slice embeddings the page's predictor keeps (the slices around the one on screen)


def inside(path: Path, folders: list[Path]) -> bool:
    """Whether the resolved ``path`` lies in (or is) one of the resolved ``folders``."""
    return any(path == folder or folder in path.parents for folder in folders)


def carried_prompts(mask: np.ndarray) -> dict:
    """The prompts a first click on a slice starts from: none, or on a slice that already holds the object (it was
    propagated there) that mask's box, so the click corrects the mask instead of starting over (a lone click gives
    LiteMedSAM little to go on; the interactive protocol prompts the same way, ``interactive.VolumeObject``)."""
    box = box_from_mask(mask)
    if box is None:
        return {"points": [], "box": None}
    return {"points": [], "box": [float(v) for v in box], "from_mask": True}


class Workspace:
    """The model, the folders the app may read and write, the open sessions and their autosave.

    Args:
        predictor: the model the page segments with, made for its run (``inference.load_predictor``).
        roots: folders whose files may be opened and written.
        demo: name -> demo dataset folder, offered as cases and readable (never written).
        state_dir: autosave and adapt runs live here.
        labels_dir: default folder for saved label files (writable); default ``roots[0]/labels`` or
            ``state_dir/labels``.
        device: torch device of the runs the app trains and loads.
    """

    def __init__(
        self,
        predictor: SegmentationPredictor,
        roots: list[Path] | None = None,
        demo: dict[str, Path] | None = None,
        state_dir: Path | None = None,
        labels_dir: Path | None = None,
        device=None,
    ) -> None:
        from samadapt.data.io import cache_root

        self.roots = [Path(r).resolve() for r in roots or []]
        for root in self.roots:
            if not root.is_dir():
                raise InputNotFoundError(f"{root}: --root must be an existing folder")
        self.demo = {k: Path(v).resolve() for k, v in (demo or {}).items()}
        self.state_dir = Path(state_dir or cache_root() / "serve").resolve()
        default_labels = self.roots[0] / "labels" if self.roots else self.state_dir / "labels"
        self.labels_dir = Path(labels_dir).resolve() if labels_dir else default_labels
        self.autosave_dir = self.state_dir / "autosave"
        self.device = device
        self.model_lock = threading.RLock()  # the predictor holds one embedding at a time
        self.sessions: dict[str, Session] = {}
        self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="samadapt-encode")
        self._pending: set = set()
        self._waiting = 0  # foreground requests waiting for the model: background encodes step aside
        self.runs: dict[str, object] = {}
        # the page's component filter (components.KEEP_COMPONENTS), carried over to every model the page switches to
        self.keep_components = getattr(predictor, "keep_components", "all")
        self.use_predictor(predictor)
        self._stop = threading.Event()
        self._autosaver = threading.Thread(target=self._autosave_loop, name="samadapt-autosave", daemon=True)
        self._autosaver.start()

    # ---- model
    def use_predictor(self, predictor: SegmentationPredictor) -> None:
        """Switch the page to ``predictor`` and its run (embeddings of the previous model are dropped)."""
        run = predictor.run
        predictor.cache_size = max(predictor.cache_size, EMBEDDINGS_KEPT)
        predictor.keep_components = self.keep_components
        with self.model_lock:
            self.run = run
            self.runs.setdefault(str(run.path or run.name), run)
            self.model_key = f"{run.label}@{id(run.model)}"
            self.predictor = predictor

    def set_keep_components(self, mode: str) -> None:
        """Keep every component of a prompt's mask (``all``) or only those the prompt touches (``prompt``)."""
        with self.model_lock:
            self.keep_components = self.predictor.keep_components = check_keep_components(mode)

    def model_info(self) -> dict:
        run = self.run
        return {
            "keep_components": self.keep_components,
            "model": run.label,
            "task": run.task,
            "classes": {str(k): v for k, v in run.classes.items()},
            "runs": list(self.runs),
            "current": str(run.path or run.name),
        }

    def cache_key(self, session: Session, axis: int, index: int) -> tuple:
        return (str(session.path), axis, index, session.preset, self.model_key)

    def encode(self, session: Session, axis: int, index: int) -> bool:
        """Put the slice's embedding into the predictor (from the cache when it is there); True when it was
        encoded now. Call with ``model_lock`` held."""
        key = self.cache_key(session, axis, index)
        fresh = not self.predictor.is_cached(key)
        self.predictor.set_image(session.image(axis, index), preprocessed=True, cache_key=key)
        return fresh

    @contextmanager
    def foreground(self):
        """Hold the model for a request of the page; queued background encodes do not start meanwhile."""
        self._waiting += 1
        try:
            self.model_lock.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self.model_lock.release()

    def prefetch(self, session: Session, axis: int, indices: list[int]) -> None:
        """Encode these slices in the background (the neighbours of the one on screen), one at a time."""
        for index in indices:
            if not 0 <= index < session.labels.shape[axis]:
                continue
            key = self.cache_key(session, axis, index)
            if self.predictor.is_cached(key) or key in self._pending:
                continue
            self._pending.add(key)

            def job(index=index, key=key):
                try:
                    if self._waiting:
                        return  # the page is waiting for the model; this slice is encoded when asked for
                    with self.model_lock:
                        if not self.predictor.is_cached(key) and session.id in self.sessions:
                            self.encode(session, axis, index)
                finally:
                    self._pending.discard(key)

            self._prefetch.submit(job)

    # ---- paths
    @property
    def readable(self) -> list[Path]:
        return [*self.roots, *self.demo.values(), self.labels_dir]

    @property
    def writable(self) -> list[Path]:
        return [*self.roots, self.labels_dir]

    def check(self, path: str | Path, write: bool = False) -> Path:
        """The resolved path when the app may open (``write``: write) it.

        Raises:
            PermissionError: outside the allowed folders (after resolving ``..`` and symlinks).
        """
        raw = Path(str(path)).expanduser()
        if write and not raw.is_absolute():
            raw = self.labels_dir / raw
        resolved = raw.resolve()
        folders = self.writable if write else self.readable
        if not inside(resolved, folders):
            verb = "write" if write else "open"
            raise PermissionError(f"{path}: outside the folders this app may {verb} ({', '.join(map(str, folders))})")
        return resolved

    def cases(self) -> list[dict]:
        """What the page offers: the demo cases, the cases of datasets under ``--root``, and image files there."""
        found: list[dict] = []
        for name, folder in self.demo.items():
            found += self._dataset_cases(folder, f"demo: {name}")
        for root in self.roots:
            found += self._folder_cases(root)
        return found[:MAX_LISTED]

    def _dataset_cases(self, folder: Path, group: str) -> list[dict]:
        try:
            spec = load_dataset(folder)
        except (FileNotFoundError, DataError):
            return []
        images = [(c.id, c.image) for c in spec.cases] + [(p.name, p) for p in spec.test_images]
        return [{"name": f"{group} / {cid}", "path": str(path)} for cid, path in images]

    def _folder_cases(self, root: Path) -> list[dict]:
        found: list[dict] = []
        for folder, dirs, files in os.walk(root):
            here = Path(folder)
            depth = len(here.relative_to(root).parts)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and depth < 4)
            if (here / "dataset.json").exists():
                cases = self._dataset_cases(here, str(here.relative_to(root.parent)))
                if cases:
                    found += cases
                    dirs[:] = []
                    continue
            if any(f.lower().endswith(".dcm") for f in files):
                found += dicom_cases(here, str(here.relative_to(root.parent)))
                dirs[:] = []  # the series under it are listed with it
                continue
            for name in sorted(files):
                if suffix_of(name) in READABLE and not name.startswith("."):
                    found.append({"name": str((here / name).relative_to(root.parent)), "path": str(here / name)})
            if len(found) > MAX_LISTED:
                break
        return found

    # ---- sessions
    def open(self, path: str | Path, preset: str | None = None) -> Session:
        """Open a case (a file, or a DICOM folder) under the readable folders; restores its autosave if any.

        Raises:
            PermissionError: outside the allowed folders. FileNotFoundError / DataError: missing or unreadable.
        """
        resolved = self.check(path)
        source, series = split_case_path(resolved)  # "<DICOM folder>#<SeriesInstanceUID>": one series of several
        for sid, live in list(self.sessions.items()):
            if live.path == resolved and preset in (None, live.preset):
                self.sessions[sid] = self.sessions.pop(sid)  # most recently used last
                return live  # a reloaded page continues where it was
        volume = read_volume(source, series=series)
        dataset, classes, axis = self._dataset_of(resolved)
        if preset is None:
            preset = (dataset.preprocessing if dataset else None) or self.run.preprocessing
            preset = preset or ("rgb" if volume.array.ndim == 4 else "mr")
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        classes = classes or self.run.classes or {1: "object 1"}
        while len(self.sessions) >= MAX_SESSIONS:
            oldest = self.sessions.pop(next(iter(self.sessions)))
            if oldest.dirty:
                self.flush(oldest)
        session = Session(
            id=uuid.uuid4().hex[:12],
            path=resolved,
            volume=volume,
            preset=preset,
            axis=axis if dataset else int(self.run.axis or 0),
            array=preprocess_volume(volume.array, preset),
            labels=np.zeros(volume.array.shape[:3], np.int32),
            objects={},
            dataset=dataset.root if dataset else None,
        )
        for value, name in sorted(classes.items()):
            session.add_object(name, value)
        self._restore(session)
        session.dirty = False
        self.sessions[session.id] = session
        return session

    def _dataset_of(self, path: Path):
        for parent in path.parents:
            if (parent / "dataset.json").exists() and inside(parent, self.readable):
                try:
                    spec = load_dataset(parent)
                except (FileNotFoundError, DataError):
                    return None, None, 0
                return spec, dict(spec.classes), spec.axis
            if parent in self.readable:
                break
        return None, None, 0

    def session(self, session_id: str) -> Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise KeyError(f"no open session {session_id!r}; open the case again") from None

    # ---- editing
    def prompt(
        self,
        session: Session,
        axis: int,
        index: int,
        value: int,
        point: list[float] | None = None,
        box: list[float] | None = None,
    ) -> dict:
        """Add a click (x, y, label 1 / 0) or set the box (x0, y0, x1, y1) of object ``value`` on one slice, and
        replace that object's mask on the slice by the model's answer to all its prompts there."""
        if value not in session.objects:
            raise ValueError(f"no object {value}; add it first")
        with session.lock:
            key = (value, axis, index)
            prompts = copy.deepcopy(session.prompts.get(key) or carried_prompts(session.plane(axis, index) == value))
            if point is not None:
                prompts["points"].append([float(point[0]), float(point[1]), int(point[2])])
                if prompts.get("from_mask") and point[2] == 1:  # a click beyond the carried mask widens its box
                    grown = edit_box(
                        np.array(prompts["box"], np.float32),
                        Click(point[0], point[1], True),
                        MARGIN,
                        session.plane(axis, index).shape,
                    )
                    prompts["box"] = [float(v) for v in grown]
            if box is not None:
                x0, y0, x1, y1 = (float(v) for v in box)
                prompts["box"] = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
                prompts.pop("from_mask", None)
            start = time.perf_counter()
            with self.foreground():
                wait_ms = (time.perf_counter() - start) * 1000
                encoded = self.encode(session, axis, index)
                encode_ms = (time.perf_counter() - start) * 1000 - wait_ms
                points = np.array([p[:2] for p in prompts["points"]], np.float32) if prompts["points"] else None
                labels = np.array([p[2] for p in prompts["points"]], np.int64) if prompts["points"] else None
                boxes = np.array(prompts["box"], np.float32) if prompts["box"] else None
                mask = self.predictor.predict(points=points, labels=labels, boxes=boxes).masks[0, 0]
            server_ms = (time.perf_counter() - start) * 1000
            session.remember("box" if box is not None else "click", axis, index)
            session.prompts[key] = prompts
            plane = session.plane(axis, index)
            plane[plane == value] = 0
            plane[mask] = value
            session.finished.add((axis, index))
            count = session.labels.shape[axis]
            carried = any(0 <= i < count and (session.plane(axis, i) == value).any() for i in (index - 1, index + 1))
        return {
            "encoded": encoded,
            "wait_ms": wait_ms,
            "encode_ms": encode_ms,
            "server_ms": server_ms,
            "pixels": int(mask.sum()),
            # a neighbour holds the object (it was propagated): the page re-propagates the correction from here
            "neighbours": carried,
        }

    def semantic(self, session: Session, axis: int, index: int) -> dict:
        """The prompt-free class map of a semantic run, written over the slice."""
        if self.run.task != "semantic":
            raise ValueError(f"{self.run.label} is a prompted model; the prompt-free output needs a semantic run")
        with session.lock:
            with self.foreground():
                self.encode(session, axis, index)
                position = slice_position(index, session.labels.shape[axis])  # as training's (data.position)
                classes = self.predictor.predict_semantic(position)
            lookup = np.array([0, *(list(self.run.classes) or [1])])
            for value, name in self.run.classes.items():
                if value not in session.objects:
                    session.add_object(name, value)
            session.remember("auto", axis, index)
            session.plane(axis, index)[...] = lookup[classes]
            session.finished.add((axis, index))
            for value in self.run.classes:  # the slice is the user's now: propagations keep it
                session.prompts.setdefault((value, axis, index), {"points": [], "box": None})
        return {"pixels": int((classes > 0).sum())}

    def erase(self, session: Session, axis: int, index: int, value: int) -> None:
        """Remove object ``value`` (and its prompts) from one slice. The slice stays the user's for that object: a
        propagation keeps it empty and stops there."""
        with session.lock:
            session.remember("erase", axis, index)
            plane = session.plane(axis, index)
            plane[plane == value] = 0
            session.prompts[(value, axis, index)] = {"points": [], "box": None}
            session.finished.add((axis, index))

    def save(self, session: Session, path: str | Path | None, overwrite: bool = False) -> Path:
        """Write the labels on the case's grid and header (format from the suffix; default NIfTI, PNG for PNG; for
        a DICOM case ``.dcm`` writes a DICOM SEG and ``*rtstruct.dcm`` an RT Structure Set, ``data.dicom_out``).

        Raises:
            PermissionError: outside the writable folders. FileExistsError: the file exists and not ``overwrite``.
        """
        if not path:
            stem = session.path.name[: -len(suffix_of(session.path))] if suffix_of(session.path) else session.path.name
            path = f"{stem}.png" if suffix_of(session.path) == ".png" else f"{stem}.nii.gz"
        target = self.check(path, write=True)
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; confirm to overwrite it")
        dicom_format = label_format(target)
        with session.lock:
            labels = session.labels.copy()
            names = {value: spec["name"] for value, spec in session.objects.items()}
        if dicom_format:
            algorithm = replace(algorithm_of(self.run), generation="SEMIAUTOMATIC")  # prompted and edited by a person
            return write_dicom_labels(session.volume, labels, target, names, algorithm, dicom_format)
        return write_label(session.volume, labels, target)

    # ---- autosave
    def autosave_path(self, path: Path) -> Path:
        return self.autosave_dir / (hashlib.sha1(str(path).encode()).hexdigest()[:16] + ".npz")

    def flush(self, session: Session) -> Path:
        """Write the session's labels, objects and prompts to its autosave file (atomically)."""
        with session.lock:
            labels = session.labels.copy()
            meta = {
                "path": str(session.path),
                "objects": {str(k): v for k, v in session.objects.items()},
                "prompts": [[*k, v] for k, v in session.prompts.items()],
                "finished": [list(k) for k in session.finished],
                "saved": time.time(),
            }
            session.dirty = False
        target = self.autosave_path(session.path)

        def write(tmp: Path) -> None:
            with tmp.open("wb") as handle:  # a handle: given a name, numpy would append ".npz"
                np.savez_compressed(handle, labels=labels, meta=np.array(json.dumps(meta)))

        return atomic_write(target, write)

    def _restore(self, session: Session) -> None:
        target = self.autosave_path(session.path)
        if not target.exists():
            return
        try:
            with np.load(target, allow_pickle=False) as saved:
                labels, meta = saved["labels"], json.loads(str(saved["meta"]))
        except (OSError, ValueError, KeyError):
            return  # an unreadable autosave is ignored, never fatal
        if labels.shape != session.labels.shape or meta.get("path") != str(session.path):
            return
        session.labels[...] = labels
        session.objects = {int(k): v for k, v in meta["objects"].items()}
        session.prompts = {(int(v), int(a), int(i)): p for v, a, i, p in meta["prompts"]}
        session.finished = {tuple(k) for k in meta.get("finished", [])}
        session.restored = float(meta.get("saved", 0.0))

    def _autosave_loop(self) -> None:
        while not self._stop.wait(AUTOSAVE_PERIOD_S):
            for session in list(self.sessions.values()):
                if session.dirty:
                    try:
                        self.flush(session)
                    except OSError:
                        session.dirty = True

    def close(self) -> None:
        """Write what is unsaved and stop the background threads."""
        self._stop.set()
        for session in list(self.sessions.values()):
            if session.dirty:
                self.flush(session)
        self._prefetch.shutdown(wait=False, cancel_futures=True)
