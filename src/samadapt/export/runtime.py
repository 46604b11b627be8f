"""Run an ONNX export with onnxruntime and numpy only (no torch): ``OnnxPredictor``, the onnxruntime backend of
``prediction.SegmentationPredictor`` (the protocol the torch ``Predictor`` implements too).

Minimal deployment: ``pip install numpy onnxruntime`` plus this file's package (``samadapt.export.runtime`` imports
nothing else of samadapt, and no torch). The preprocessing is ``samadapt.transforms.model_input`` written in numpy
(antialiased bilinear resize of the longest side, zero padding, clamp), and masks come back at the original size
through the same un-padding and bilinear resizes as ``InputGeometry.masks_to_original``: ``export.geometry``, the
deployment's own copy of ``samadapt.transforms``' geometry (that one needs torch).

Example:
    >>> predictor = OnnxPredictor("exports/lite_medsam")      # written by `samadapt export`
    >>> predictor.set_image(slice_2d)                         # raw (H, W): uint8 / 255, else min-max
    >>> masks = predictor.predict(boxes=np.array([[x0, y0, x1, y1]])).masks
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samadapt.components import check_keep_components, keep_prompted_batch
from samadapt.errors import ConfigError, InputNotFoundError, RunError
from samadapt.export.geometry import InputGeometry, model_input
from samadapt.files import file_sha256
from samadapt.intensity import to_unit_range
from samadapt.prediction import Prediction
from samadapt.selection import DEFAULT_ONE_CLICK, best_candidate, is_single_click, one_click_best

__all__ = [
    "ExportedRun",
    "OnnxPredictor",
    "Prediction",
    "is_export_dir",
    "load_export",
    "read_export_manifest",
    "to_unit_range",
]

FORMAT = "samadapt-onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENCODER = "image_encoder.onnx"
DECODER = "decoder.onnx"
SLICE_POSITION = "slice_position"  # the semantic decoder's input of runs trained with model.slice_position


# -- the export directory ----------------------------------------------------------------------------------------


def is_export_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder written by ``samadapt export --format onnx``."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, OSError):
        return False


def read_export_manifest(path: str | Path) -> dict:
    """The manifest of an export directory, checked for its format and version.

    Raises:
        FileNotFoundError: no manifest. ValueError: not a samadapt ONNX export, or a newer format version.
    """
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise InputNotFoundError(f"{manifest_path} not found: not an export directory (samadapt export --format onnx)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise RunError(f"{manifest_path} is not valid JSON: {error}") from error
    if manifest.get("format") != FORMAT:
        raise RunError(f"{manifest_path}: not a samadapt ONNX export (format {manifest.get('format')!r})")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise RunError(
            f"{manifest_path}: export format {manifest['format_version']} is newer than this runtime's "
            f"{FORMAT_VERSION}; update samadapt"
        )
    return manifest


@dataclass
class ExportedRun:
    """An export directory seen as a run: what ``predict_volume`` / ``evaluate`` read from a ``Run``, no model.

    ``manifest`` is the run's own manifest (preprocessing preset, slicing axis, ...); ``export`` the export's.
    """

    path: Path
    export: dict
    name: str
    task: str
    classes: dict[int, str] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    model: None = None
    precision: str = "fp32"
    one_click: str = DEFAULT_ONE_CLICK  # as ``runs.Run.one_click``

    @property
    def label(self) -> str:
        return f"{self.path.name} (onnx, {self.name})"

    @property
    def base_model(self) -> str:
        return self.name

    @property
    def axis(self) -> int | None:
        return self.manifest.get("axis")

    @property
    def blend(self) -> float:
        """The blend the graphs were exported at (``peft.blend``)."""
        return float((self.manifest.get("peft") or {}).get("blend", 1.0))

    @property
    def preprocessing(self) -> str:
        return self.manifest.get("preprocessing") or ""

    @property
    def select_single_click(self) -> bool:  # as ``runs.Run.select_single_click``, from the exported run's manifest
        return one_click_best(self.export.get("run_manifest"), self.one_click)


def load_export(path: str | Path) -> ExportedRun:
    """An export directory as an ``ExportedRun`` (checked manifest; the graphs are opened by ``OnnxPredictor``)."""
    manifest = read_export_manifest(path)
    run_manifest = dict(manifest.get("run_manifest") or {})
    preset, axis = manifest["preprocessing"].get("preset"), manifest["preprocessing"].get("axis")
    run_manifest.setdefault("preprocessing", preset)
    run_manifest.setdefault("axis", axis)
    if run_manifest.get("axis") is None:
        run_manifest.pop("axis")
    return ExportedRun(
        path=Path(path),
        export=manifest,
        name=manifest.get("base_model") or "model",
        task=manifest["task"],
        classes={int(k): v for k, v in manifest.get("classes", {}).items()},
        manifest=run_manifest,
    )


# -- the predictor -------------------------------------------------------------------------------------------------


def _session_options(threads: int | None, spin: bool = True):
    """onnxruntime session options: ``threads`` intra-op threads (None: one per physical core); ``spin`` whether the
    idle workers spin-wait for the next run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


@dataclass(frozen=True)
class _Device:
    type: str = "cpu"


class OnnxPredictor:
    """``samadapt.predict.Predictor`` on onnxruntime: cache an image embedding, then decode masks for prompts.

    Args:
        export_dir: a folder written by ``samadapt export --format onnx``.
        cache_size: how many embeddings ``set_image(..., cache_key=...)`` keeps (least recently used dropped first).
        threads: onnxruntime intra-op threads (default: onnxruntime's, one per physical core).
        providers: onnxruntime execution providers (default: CPU).
        check_files: verify the graphs' SHA-256 against the manifest before loading.
        select_single_click / keep_components: as ``Predictor``'s (None: the default one-click rule).
    """

    run = None  # the run it predicts for (``inference.load_predictor`` sets it): an ExportedRun, or the exported Run

    def __init__(
        self,
        export_dir: str | Path,
        cache_size: int = 0,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        check_files: bool = False,
        select_single_click: bool | None = None,
        keep_components: str = "all",
    ) -> None:
        import onnxruntime as ort

        self.export_dir = Path(export_dir)
        self.manifest = read_export_manifest(self.export_dir)
        default = one_click_best(self.manifest.get("run_manifest"))
        self.select_single_click = default if select_single_click is None else select_single_click
        self.keep_components = check_keep_components(keep_components)
        self.task = self.manifest["task"]
        self.img_size = int(self.manifest["img_size"])
        self.mask_input_size = tuple(self.manifest["mask_input_size"])
        self.device = _Device("cpu")
        providers = list(providers or ["CPUExecutionProvider"])
        files = self.manifest["files"]
        if check_files:
            _check_sha256(self.export_dir, files)
        self.encoder = ort.InferenceSession(
            str(self.export_dir / files["image_encoder"]["path"]), _session_options(threads), providers=providers
        )
        # each session has its own thread pool, whose workers spin for a while after a run: after the decoder's
        # short runs they would hold the cores the next slice's encoder needs (a volume, box per slice, 2 threads:
        # 400 -> 380 ms per slice with the decoder's spinning off)
        self.decoder = ort.InferenceSession(
            str(self.export_dir / files["decoder"]["path"]), _session_options(threads, spin=False), providers=providers
        )
        # a semantic graph of a run trained with model.slice_position reads each slice's position too
        self.takes_slice_position = SLICE_POSITION in {node.name for node in self.decoder.get_inputs()}
        self.geometry: InputGeometry | None = None
        self.embedding: np.ndarray | None = None
        self.cache_size = cache_size
        self._cache: OrderedDict[Hashable, tuple[np.ndarray, InputGeometry]] = OrderedDict()

    def encode(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) model inputs in [0, 1] -> image embeddings (B, 256, S/16, S/16)."""
        return self.encoder.run(None, {"images": np.ascontiguousarray(images, dtype=np.float32)})[0]

    def set_image(self, image: np.ndarray, preprocessed: bool = False, cache_key: Hashable | None = None) -> None:
        """Encode an (H, W) or (H, W, 3) image (``Predictor.set_image``: ``preprocessed`` images are in [0, 1] and
        used as is; ``cache_key`` names the image so that setting it again costs nothing)."""
        if cache_key is not None and cache_key in self._cache:
            self._cache.move_to_end(cache_key)
            self.embedding, self.geometry = self._cache[cache_key]
            return
        image = np.asarray(image)
        tensor, self.geometry = model_input(image if preprocessed else to_unit_range(image), self.img_size)
        self.embedding = self.encode(tensor)
        if cache_key is not None and self.cache_size > 0:
            self._cache[cache_key] = (self.embedding, self.geometry)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def is_cached(self, cache_key: Hashable) -> bool:
        """Whether ``set_image(..., cache_key=cache_key)`` finds this embedding in the cache."""
        return cache_key in self._cache

    def _semantic_logits(self, embeddings: np.ndarray, positions: Sequence[float] | None) -> np.ndarray:
        if self.task != "semantic":
            raise ValueError("this export is prompted: give points or boxes to predict()")
        feeds = {"image_embeddings": embeddings}
        if self.takes_slice_position:  # as Predictor: positions go only to a graph that reads them
            if positions is None:
                raise ValueError(
                    "this export was trained with model.slice_position: give each slice's position along its axis"
                )
            feeds[SLICE_POSITION] = np.asarray(positions, dtype=np.float32).reshape(len(embeddings))
        return self.decoder.run(None, feeds)[0]

    def semantic_batch(self, images: Sequence[np.ndarray], positions: Sequence[float] | None = None) -> np.ndarray:
        """Prompt-free class maps of several preprocessed slices of one size, in one encoder call: (B, H, W) int.
        ``positions``: each slice's position along its axis (``data.position``), read by exports of runs trained with
        ``model.slice_position`` (required there) and ignored by others."""
        tensors, geometries = zip(*(model_input(image, self.img_size) for image in images), strict=True)
        logits = self._semantic_logits(self.encode(np.concatenate(tensors)), positions)
        return geometries[0].masks_to_original(logits, from_size=logits.shape[-1]).argmax(1)

    def predict_semantic(self, position: float | None = None) -> np.ndarray:
        """Prompt-free class map of the current image (semantic exports): (H, W) int, 0 = background; ``position``
        as in ``semantic_batch``."""
        if self.embedding is None or self.geometry is None:
            raise RuntimeError("call set_image() before predict_semantic()")
        logits = self._semantic_logits(self.embedding, None if position is None else [position])
        return self.geometry.masks_to_original(logits, from_size=logits.shape[-1]).argmax(1)[0]

    def predict(
        self,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool | None = None,
        text: str | Sequence[str] | None = None,
    ) -> Prediction:
        """Masks for one prompt set, or for P boxes at once (arguments as ``Predictor.predict``; an export has no
        sentence encoder, so a ``text`` prompt is refused).

        Args:
            points: (N, 2) or (P, N, 2) clicks in (x, y) pixels of the original image.
            labels: (N,) or (P, N): 1 foreground, 0 background.
            boxes: (4,) or (P, 4) XYXY in pixels of the original image.
            mask_input: (1, s/4, s/4) or (P, 1, s/4, s/4) low-res logits of a previous prediction.
            multimask_output: True: three candidates; False: the single mask; None: the best candidate for one
                click alone (``is_single_click``, ``select_single_click``), as ``Predictor.predict``.
        """
        if text is not None:
            raise ConfigError(f"{self.export_dir}: an ONNX export takes no text prompt; use the torch backend")
        if self.embedding is None or self.geometry is None:
            raise RuntimeError("call set_image() before predict()")
        select = multimask_output is None and self.select_single_click and is_single_click(labels, boxes, mask_input)
        if self.task == "semantic":
            raise ValueError("this export is semantic (prompt-free K + 1 head): use predict_semantic()")
        geometry = self.geometry
        coords, kinds = [], []
        if points is not None:
            if labels is None:
                raise ValueError("points need labels (1 foreground, 0 background)")
            point_coords = geometry.coords_to_input(np.asarray(points))
            point_labels = np.asarray(labels, dtype=np.float32)
            if point_coords.ndim == 2:
                point_coords, point_labels = point_coords[None], point_labels[None]
            if point_coords.ndim != 3 or point_coords.shape[-1] != 2 or point_labels.shape != point_coords.shape[:2]:
                raise ValueError(
                    f"points must be (P, N, 2) with labels (P, N), got {point_coords.shape} and {point_labels.shape}"
                )
            coords.append(point_coords)
            kinds.append(point_labels)
        if boxes is not None:
            corners = geometry.boxes_to_input(np.asarray(boxes)).reshape(-1, 2, 2)
            coords.append(corners)
            kinds.append(np.broadcast_to(np.array([2.0, 3.0], np.float32), corners.shape[:2]))
        elif points is not None:  # points without a box end with one padding point, as PromptEncoder does
            coords.append(np.zeros((coords[0].shape[0], 1, 2), np.float32))
            kinds.append(np.full((coords[0].shape[0], 1), -1.0, np.float32))
        sizes = {len(c) for c in coords}
        if mask_input is not None:
            mask_input = np.asarray(mask_input, dtype=np.float32)
            if mask_input.ndim == 3:
                mask_input = mask_input[None]
            if mask_input.ndim != 4 or mask_input.shape[1] != 1 or mask_input.shape[-2:] != self.mask_input_size:
                raise ValueError(
                    f"a mask prompt must be (P, 1, {self.mask_input_size[0]}, {self.mask_input_size[1]}) low-res "
                    f"logits, got {mask_input.shape}"
                )
            sizes.add(len(mask_input))
        if len(sizes) > 1:
            raise ValueError(f"prompt batch sizes differ: {sorted(sizes)}")
        if not coords:
            raise ValueError("the ONNX decoder needs points or boxes (a mask alone is not a prompt it takes)")
        feeds = {
            "image_embeddings": self.embedding,
            "point_coords": np.ascontiguousarray(np.concatenate(coords, axis=1), dtype=np.float32),
            "point_labels": np.ascontiguousarray(np.concatenate(kinds, axis=1), dtype=np.float32),
            "mask_input": mask_input if mask_input is not None else np.zeros((1, 1, *self.mask_input_size), np.float32),
            "has_mask_input": np.array([1.0 if mask_input is not None else 0.0], np.float32),
        }
        logits, scores = self.decoder.run(None, feeds)
        keep = slice(1, None) if multimask_output or select else slice(0, 1)
        logits, scores = logits[:, keep], scores[:, keep]
        if select:
            logits, scores = best_candidate(logits, scores)
        masks = geometry.masks_to_original(logits, from_size=logits.shape[-1]) > 0
        masks = keep_prompted_batch(masks, points, labels, boxes) if self.keep_components == "prompt" else masks
        return Prediction(masks=masks, scores=scores, low_res_logits=logits)


def _check_sha256(folder: Path, files: dict) -> None:
    for role, entry in files.items():
        if file_sha256(folder / entry["path"]) != entry["sha256"]:
            raise RunError(f"{folder / entry['path']}: checksum differs from the manifest's ({role}); re-export")
