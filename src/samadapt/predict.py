"""Interactive prediction: encode an image once, then decode masks for any number of prompts.

The predictor owns the image geometry: prompts are given in (x, y) pixels of the original image and masks come back
at the original size. Intensities: a slice that went through a preprocessing preset is passed with
``preprocessed=True`` and fed to the model as is (``transforms.model_input``, the same path as training); a raw image
from a user is first brought to [0, 1] by ``transforms.to_unit_range`` (uint8 / 255, anything else min-max). The
model then applies its checkpoint's own normalisation (``Sam.normalize``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Hashable, Sequence
from pathlib import Path

import numpy as np
import torch

from samadapt.accel import accelerate
from samadapt.components import check_keep_components, keep_largest, keep_prompted_batch
from samadapt.data.position import slice_position
from samadapt.data.preprocess import preprocess_volume, volume_slice
from samadapt.device import autocast, resolve_device
from samadapt.errors import ConfigError, DataError, InputNotFoundError
from samadapt.intensity import to_unit_range
from samadapt.interactive import ask
from samadapt.models.sam import Sam, takes_slice_position
from samadapt.precision import INFERENCE_PRECISION
from samadapt.prediction import Prediction, SegmentationPredictor
from samadapt.prompts import SliceMask, propagate_box
from samadapt.selection import best_candidate, is_single_click
from samadapt.transforms import InputGeometry, model_input

__all__ = [
    "Prediction",
    "Predictor",
    "SegmentationPredictor",
    "best_candidate",
    "is_single_click",
    "predict_folder",
    "predict_volume",
    "to_unit_range",
]


VOLUME_CACHE = 16  # embeddings a volume's prediction keeps: objects that share slices encode them once


class Predictor:
    """Cache an image embedding, then predict masks for points, boxes or a previous mask: the torch backend of
    ``prediction.SegmentationPredictor`` (``inference.load_predictor(run, "torch")`` makes one for a run).

    Example:
        >>> predictor = Predictor(build_model("lite_medsam"))
        >>> predictor.set_image(slice_2d)
        >>> out = predictor.predict(boxes=np.array([[x0, y0, x1, y1]]))

    For a ``Run``, ``Predictor.for_run`` answers one click the way the run was trained.
    """

    run = None  # the Run it predicts for (``for_run``); None on a bare model

    def __init__(
        self,
        model: Sam,
        device: str | torch.device | None = None,
        precision: str = INFERENCE_PRECISION,
        cache_size: int = 0,
        select_single_click: bool = True,
        keep_components: str = "all",
    ) -> None:
        """``device``: None / "auto" picks CUDA when available (``device.resolve_device``); ``precision``: fp32,
        bf16, fp16 or auto (``precision.resolve_precision``: bf16 where the device has native bf16 kernels),
        applied as autocast; the default is ``precision.INFERENCE_PRECISION`` (fp32, no autocast); ``cache_size``:
        how many embeddings ``set_image(..., cache_key=...)`` keeps (least recently used dropped first).
        ``select_single_click``: one click alone is answered by the best of the three candidates (SAM's practice,
        right for an un-adapted model; a run decides it from its manifest: ``for_run``). ``keep_components``:
        ``all`` (default) or ``prompt``: only the connected components the prompt touches
        (``components.keep_prompted``).

        The model is put in eval mode and accelerated for the CPU in place (``accel.accelerate``: the same function,
        oneDNN's kernels for CPU inference)."""
        self.select_single_click = select_single_click
        self.keep_components = check_keep_components(keep_components)
        self.device = resolve_device(device)
        self.model = accelerate(model.to(self.device).eval(), "cpu")
        self.precision = precision
        self.geometry: InputGeometry | None = None
        self.embedding: torch.Tensor | None = None
        self.cache_size = cache_size
        self._cache: OrderedDict[Hashable, tuple[torch.Tensor, InputGeometry]] = OrderedDict()

    @classmethod
    def for_run(
        cls,
        run,
        device: str | torch.device | None = None,
        precision: str | None = None,
        cache_size: int = 0,
        keep_components: str = "all",
    ) -> Predictor:
        """The predictor of a ``Run``: its model at ``precision`` (None: the run's), answering one click as the run
        was trained (``Run.select_single_click``)."""
        predictor = cls(
            run.model,
            device=device,
            precision=precision or run.precision,
            cache_size=cache_size,
            select_single_click=run.select_single_click,
            keep_components=keep_components,
        )
        predictor.run = run
        return predictor

    def is_cached(self, cache_key: Hashable) -> bool:
        """Whether ``set_image(..., cache_key=cache_key)`` finds this embedding in the cache."""
        return cache_key in self._cache

    def _autocast(self):
        return autocast(self.device, self.precision)

    @torch.inference_mode()
    def set_image(self, image: np.ndarray, preprocessed: bool = False, cache_key: Hashable | None = None) -> None:
        """Encode an (H, W) or (H, W, 3) image and keep its embedding for the following ``predict`` calls.

        ``preprocessed``: the image already went through a preset and lies in [0, 1]; it is not rescaled again.
        ``cache_key``: names this image (e.g. its slice index); an image set again under the same key is not
        encoded again (the caller guarantees that the key identifies the image).
        """
        if cache_key is not None and cache_key in self._cache:
            self._cache.move_to_end(cache_key)
            self.embedding, self.geometry = self._cache[cache_key]
            return
        image = np.asarray(image)
        tensor, self.geometry = model_input(image if preprocessed else to_unit_range(image), self.model.img_size)
        with self._autocast():
            self.embedding = self.model.encode_image(tensor.to(self.device)).float()
        if cache_key is not None and self.cache_size > 0:
            self._cache[cache_key] = (self.embedding, self.geometry)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _slice_positions(self, positions: Sequence[float] | None) -> torch.Tensor | None:
        """The positions a model trained with ``model.slice_position`` reads, as (B,); None for any other model
        (callers give positions whenever they know them; such a model never saw one). Missing for a model that
        needs them: None, and the decoder says so."""
        if positions is None or not takes_slice_position(self.model):
            return None
        return torch.tensor([float(p) for p in positions], dtype=torch.float32, device=self.device)

    @torch.inference_mode()
    def semantic_batch(self, images: Sequence[np.ndarray], positions: Sequence[float] | None = None) -> np.ndarray:
        """Prompt-free class maps of several preprocessed slices of one size, in one encoder call: (B, H, W) int.

        ``positions``: each slice's position along its volume's axis (``data.position.slice_position``), read by
        runs trained with ``model.slice_position`` (required there) and ignored by others.
        """
        tensors, geometries = zip(*(model_input(image, self.model.img_size) for image in images), strict=True)
        with self._autocast():
            embeddings = self.model.encode_image(torch.cat(tensors).to(self.device))
            logits, _ = self.model.decode(embeddings, slice_position=self._slice_positions(positions))
        logits = geometries[0].masks_to_original(logits.float(), from_size=logits.shape[-1])
        return logits.argmax(1).cpu().numpy()

    @torch.inference_mode()
    def predict(
        self,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | torch.Tensor | None = None,
        multimask_output: bool | None = None,
        text: str | Sequence[str] | None = None,
    ) -> Prediction:
        """Masks for one prompt set, or for P boxes (or P texts) at once.

        Args:
            points: (N, 2) or (P, N, 2) clicks in (x, y) pixels of the original image.
            labels: (N,) or (P, N): 1 foreground, 0 background.
            boxes: (4,) or (P, 4) XYXY in pixels of the original image.
            mask_input: (1, s/4, s/4) or (P, 1, s/4, s/4) low-res logits of a previous prediction.
            multimask_output: True: three candidate masks per prompt set; False: the single-mask output; None
                (default): for a prompt set of one click alone (``is_single_click``) and ``select_single_click``,
                the best of the three candidates by predicted IoU (``best_candidate``); otherwise the single mask.
                With ``keep_components="prompt"`` the masks keep only the components the prompt touches (the
                low-res logits stay as decoded).
            text: a phrase, or P phrases, naming the target (a model trained with text prompts; the sentence
                encoder of ``samadapt.text`` must be installed).
        """
        if self.embedding is None or self.geometry is None:
            raise RuntimeError("call set_image() before predict()")
        geometry = self.geometry
        point_input = None
        if points is not None:
            if labels is None:
                raise ValueError("points need labels (1 foreground, 0 background)")
            coords = torch.as_tensor(geometry.coords_to_input(np.asarray(points)), device=self.device)
            point_labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64, device=self.device)
            if coords.dim() == 2:
                coords, point_labels = coords[None], point_labels[None]
            point_input = (coords, point_labels)
        box_input = None
        if boxes is not None:
            box_input = torch.as_tensor(geometry.boxes_to_input(np.asarray(boxes)), device=self.device)
            box_input = box_input.reshape(-1, 4)
        if mask_input is not None:
            mask_input = torch.as_tensor(mask_input, dtype=torch.float32, device=self.device)
            if mask_input.dim() == 3:
                mask_input = mask_input[None]
        select = (
            multimask_output is None
            and text is None
            and self.select_single_click
            and is_single_click(labels, boxes, mask_input)
        )
        text_input = None
        if text is not None:
            from samadapt.text.encoder import embed_phrases

            text_input = embed_phrases([text] if isinstance(text, str) else list(text), self.device)
        with self._autocast():
            logits, scores = self.model.decode(
                self.embedding,
                point_input,
                box_input,
                mask_input,
                multimask_output=bool(multimask_output or select),
                text=text_input,
            )
        logits, scores = logits.float(), scores.float()
        if select:
            logits, scores = best_candidate(logits, scores)
        masks = (geometry.masks_to_original(logits, from_size=logits.shape[-1]) > 0).cpu().numpy()
        if self.keep_components == "prompt" and text is None:
            masks = keep_prompted_batch(masks, points, labels, boxes)
        return Prediction(masks=masks, scores=scores.cpu().numpy(), low_res_logits=logits)

    @torch.inference_mode()
    def predict_semantic(self, position: float | None = None) -> np.ndarray:
        """Prompt-free class map of the current image (semantic models): (H, W) int, 0 = background, k = class k.

        ``position``: the slice's position along its volume's axis, as in ``semantic_batch``.
        """
        if self.embedding is None or self.geometry is None:
            raise RuntimeError("call set_image() before predict_semantic()")
        slice_position = self._slice_positions(None if position is None else [position])
        with self._autocast():
            logits, _ = self.model.decode(self.embedding, slice_position=slice_position)
        logits = self.geometry.masks_to_original(logits.float(), from_size=logits.shape[-1])
        return logits.argmax(1)[0].cpu().numpy()


def default_batch_size(device: torch.device) -> int:
    """Slices per encoder call: a CPU gains nothing from batching (it is compute-bound at batch 1), a GPU does."""
    return 8 if device.type == "cuda" else 1


def predict_volume(
    run,
    volume,
    points: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    preprocessing: str | None = None,
    device: str | torch.device | None = None,
    precision: str | None = None,
    axis: int | None = None,
    batch_size: int | None = None,
    predictor: SegmentationPredictor | None = None,
    text: str | None = None,
    keep_components: str = "all",
    largest_component: Collection[int] | str | None = None,
    memory: bool = False,
) -> np.ndarray:
    """Segment a whole ``Volume`` slice by slice along the run's slicing axis; returns labels on the volume's grid.

    Slices are taken exactly as training took them (``data.preprocess.volume_slice`` with the run's preset and axis,
    then ``transforms.model_input``). Semantic runs need no prompt and are encoded ``batch_size`` slices at a time.
    Prompted runs take prompts in voxel coordinates (x, y, z) = array index [z, y, x], each row one object whose
    class id is the optional last column (default: the run's first class):

    - ``points`` rows (x, y, z, label[, class]): the clicks of one class on one slice form one prompt set;
    - ``boxes`` rows (x0, y0, z0, x1, y1, z1[, class]): a volume box whose middle slice is segmented first, each
      next slice then prompted with the box of its neighbour's mask, forward and backward, until the box's range
      ends or the mask vanishes (LiteMedSAM's way; with ``memory`` each next slice also gets its neighbour's
      low-resolution logits as mask prompt: ``interactive.ask``); or rows (x0, y0, x1, y1, z) of single-slice boxes
      (axis 0).

    - ``text``: a phrase naming the target (a run trained with text prompts): every slice is segmented from the
      text alone, and labelled with the class the run's phrase book gives the phrase (else the run's first class).

    Objects are written in the order given (a later object wins where two overlap). Embeddings are cached per
    slice, so objects that share slices do not encode them twice. ``predictor``: any backend's, made for ``run``
    (``inference.load_predictor``: ``run`` may then be an export directory's ``ExportedRun``); None: the torch
    ``Predictor`` of ``run.model`` on ``device`` at ``precision`` (default: the run's).

    Options (off by default): ``keep_components="prompt"`` keeps, of each prompted slice mask, only the components
    its prompt touches (``components.keep_prompted``; a given ``predictor`` applies its own ``keep_components``);
    ``largest_component`` lists the classes (or ``"all"``) reduced to their largest 3D connected component
    (``components.keep_largest``; which classes gain is decided from labelled slices by
    ``eval.postprocess.decide_largest_component``).
    """
    if predictor is None:
        predictor = Predictor.for_run(
            run, device=device, precision=precision, cache_size=VOLUME_CACHE, keep_components=keep_components
        )
    labels = _predict_volume(run, volume, points, boxes, preprocessing, axis, batch_size, predictor, text, memory)
    if largest_component == "all":
        largest_component = list(run.classes) or [1]
    return keep_largest(labels, largest_component) if largest_component else labels


def _predict_volume(run, volume, points, boxes, preprocessing, axis, batch_size, predictor, text, memory) -> np.ndarray:
    preset = preprocessing or run.preprocessing or "mr"
    axis = int((run.axis or 0) if axis is None else axis)
    array = preprocess_volume(volume.array, preset)
    labels = np.zeros(volume.array.shape[:3], np.int16)
    planes = np.moveaxis(labels, axis, 0)  # a view: writing a plane writes the volume
    this_call = object()  # keys this volume's slices apart in a predictor the caller reuses across volumes

    def encode(index: int) -> None:
        predictor.set_image(volume_slice(array, index, axis, preset), preprocessed=True, cache_key=(this_call, index))

    class_ids = list(run.classes) or [1]
    if run.task == "semantic":
        lookup = np.array([0, *class_ids])
        step = batch_size or default_batch_size(predictor.device)
        for start in range(0, planes.shape[0], step):
            stop = min(start + step, planes.shape[0])
            images = [volume_slice(array, i, axis, preset) for i in range(start, stop)]
            positions = [slice_position(i, planes.shape[0]) for i in range(start, stop)]
            planes[start:stop] = lookup[predictor.semantic_batch(images, positions)]
        return labels
    if text is not None:
        if points is not None or boxes is not None:
            raise ConfigError("give a text prompt alone on a volume, or points / boxes, not both")
        from samadapt.text.phrases import class_for_phrase

        value = class_for_phrase(run.manifest.text if run.manifest else None, text, default=class_ids[0])
        for index in range(planes.shape[0]):
            encode(index)
            planes[index][predictor.predict(text=text).masks[0, 0]] = value
        return labels
    if points is None and boxes is None:
        raise ConfigError("this model is prompted: give --points, --boxes (voxel coordinates) or --text")
    if points is not None:
        points = np.atleast_2d(np.asarray(points, np.float32))
        if points.shape[1] not in (4, 5):
            raise ConfigError("points need 4 columns (x, y, z, label) or 5 (x, y, z, label, class)")
        objects = points[:, 4].astype(int) if points.shape[1] == 5 else np.full(len(points), class_ids[0])
        planar = np.array([_to_plane(x, y, z, axis) for x, y, z in points[:, :3]])
        for value in dict.fromkeys(objects.tolist()):
            for index in np.unique(planar[objects == value, 0]).astype(int):
                rows = (objects == value) & (planar[:, 0] == index)
                encode(index)
                mask = predictor.predict(points=planar[rows, 1:], labels=points[rows, 3].astype(int)).masks[0, 0]
                planes[index][mask] = value
    if boxes is not None:
        boxes = np.atleast_2d(np.asarray(boxes, np.float32))
        if boxes.shape[1] in (6, 7):
            for row in boxes:
                value = int(row[6]) if len(row) == 7 else class_ids[0]
                _propagate_box(predictor, encode, planes, _box_to_plane(row[:6], axis), value, memory)
        elif boxes.shape[1] == 5:
            if axis != 0:
                raise ConfigError("single-slice boxes (x0, y0, x1, y1, z) need slicing axis 0; give volume boxes")
            for x0, y0, x1, y1, z in boxes:
                encode(int(z))
                planes[int(z)][predictor.predict(boxes=np.array([x0, y0, x1, y1])).masks[0, 0]] = class_ids[0]
        else:
            raise ConfigError("boxes need 5 columns (x0, y0, x1, y1, z), or 6 / 7 (x0, y0, z0, x1, y1, z1[, class])")
    return labels


def _to_plane(x: float, y: float, z: float, axis: int) -> tuple[float, float, float]:
    """Voxel (x, y, z) -> (slice index along ``axis``, x, y in that slice's image)."""
    index = (z, y, x)  # array order
    row, col = (index[k] for k in range(3) if k != axis)
    return index[axis], col, row


def _box_to_plane(box: np.ndarray, axis: int) -> tuple[int, int, np.ndarray]:
    """A voxel box (x0, y0, z0, x1, y1, z1) -> (first slice, last slice, (x0, y0, x1, y1) in the slice image)."""
    first, x0, y0 = _to_plane(*box[:3], axis)
    last, x1, y1 = _to_plane(*box[3:], axis)
    return int(min(first, last)), int(max(first, last)), np.array([x0, y0, x1, y1], np.float32)


def _propagate_box(predictor: SegmentationPredictor, encode, planes: np.ndarray, box, value: int, memory: bool) -> None:
    """One volume box: its middle slice segmented first, then ``prompts.propagate_box`` within the box's slices,
    stopping where the mask vanishes."""
    first, last, plane_box = box

    def segment(index: int, current: np.ndarray, previous: SliceMask | None) -> SliceMask:
        encode(index)
        return ask(predictor, current, previous=previous, memory=memory)

    def write(index: int, mask: np.ndarray) -> None:
        planes[index][mask] = value

    first, last = max(first, 0), min(last, planes.shape[0] - 1)
    propagate_box(segment, write, (first + last) // 2, plane_box, first, last)


def predict_folder(
    run,
    input_dir: str | Path,
    output_dir: str | Path,
    device: str | torch.device | None = None,
    preprocessing: str | None = None,
    progress: bool = True,
    predictor: SegmentationPredictor | None = None,
    precision: str | None = None,
    largest_component: Collection[int] | str | None = None,
) -> list[Path]:
    """Segment every image of a folder with a semantic run (nnU-Net style: ``imagesTs/`` -> ``predictions/``).

    Input files are NIfTI / NRRD / MHA / PNG (``CASE_0000.nii.gz`` or ``CASE.nii.gz``); each prediction is written
    atomically as ``output_dir/CASE<same ending>`` on the input's grid. Cases whose prediction already exists are
    skipped, so a killed run continues where it stopped. ``predictor``, ``device``, ``precision``,
    ``largest_component``: as ``predict_volume``'s. Returns the paths written now.

    Raises:
        ValueError: the run is prompted (a folder has no prompts), or the folder holds no image.
    """
    from tqdm.auto import tqdm

    from samadapt.data.io import ITK, NIFTI, read_volume, suffix_of, write_label

    if run.task != "semantic":
        raise ValueError(
            "folder prediction needs a semantic run (e.g. trained with the samed recipe); a prompted model needs "
            "prompts per case: use samadapt predict IMAGE --points / --boxes"
        )
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise InputNotFoundError(f"{input_dir}: not a folder")
    images = sorted(p for p in input_dir.iterdir() if p.is_file() and suffix_of(p) in (*NIFTI, *ITK, ".png"))
    if not images:
        raise DataError(f"{input_dir}: no NIfTI / NRRD / MHA / PNG image in this folder")
    written = []
    for path in tqdm(images, desc=f"predict {run.label}", disable=not progress, unit="case"):
        suffix = suffix_of(path)
        case = path.name[: -len(suffix)].removesuffix("_0000")
        target = output_dir / f"{case}{suffix}"
        if target.exists():
            continue
        volume = read_volume(path)
        labels = predict_volume(
            run,
            volume,
            preprocessing=preprocessing,
            device=device,
            precision=precision,
            predictor=predictor,
            largest_component=largest_component,
        )
        written.append(write_label(volume, labels, target))
    return written
