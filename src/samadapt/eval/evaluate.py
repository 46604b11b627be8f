"""Evaluation protocols: the same simulated prompts, from the same seed, for an adapted model and its baseline.

Protocols: ``none`` (semantic models: all classes at once), ``point:N`` (the centre click of each object, then N - 1
corrective clicks in the largest error region of the prediction so far), ``box`` (tight box), ``box:J`` (each side
jittered by up to J pixels), ``text`` / ``text:heldout`` (each class present named by a held-out phrase of the
run's phrase book, one never used in training) and ``text:name`` (named by its plain class name). Objects are one
per class per slice (``class``) or one per connected component (``instance``); their predictions are merged per class.

Whole volumes are scored in 3D with the voxel spacing; a selection of slices (e.g. held-out slices of a volume) is
scored slice by slice in 2D, each slice counting as one unit of the mean.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from samadapt.components import largest_component as largest_component_of
from samadapt.device import distributed_context
from samadapt.errors import ConfigError, DataError
from samadapt.eval.metrics import EMPTY_MASK_CONVENTIONS, aggregate, binary_metrics, slice_dice
from samadapt.eval.protocols import Protocol, parse_protocol
from samadapt.files import atomic_write_text
from samadapt.predict import Predictor, default_batch_size
from samadapt.prediction import SegmentationPredictor
from samadapt.prompts import box_from_mask, iterative_clicks, objects
from samadapt.runs import Run


@dataclass
class SliceResult:
    case: str
    slice: int
    image: np.ndarray
    gt: np.ndarray  # (H, W) dataset labels
    pred: dict[int, np.ndarray]  # class id -> (H, W) bool
    prompts: list = field(default_factory=list)  # (kind, array) for the overlay


def _seed(base: int, case: str, index: int, class_id: int) -> np.random.Generator:
    """A generator that depends only on (seed, case, slice, class): identical prompts for every model evaluated."""
    return np.random.default_rng([base, zlib.crc32(case.encode()), index, class_id])


def predict_slice(
    predictor: SegmentationPredictor,
    run: Run,
    item: dict,
    classes: Sequence[int],
    protocol: Protocol,
    objects_mode: str,
    seed: int,
) -> SliceResult:
    """Predict every class of one slice under ``protocol``; ``predictor`` already holds this slice's embedding."""
    label = item["label"]
    result = SliceResult(
        item["case"], item["slice"], item["image"], label, {c: np.zeros(label.shape, bool) for c in classes}
    )
    if protocol.kind == "none":
        _check_semantic(run)
        # the position training fed this slice (``data.position``): read by runs with model.slice_position only
        return semantic_result(item, predictor.predict_semantic(item.get("position")), run, classes)
    if run.task == "semantic":
        raise ConfigError(f"a semantic model takes no prompts; evaluate it with --prompt none, not {protocol}")
    if protocol.kind == "text":
        from samadapt.eval.text_protocol import predict_text

        return predict_text(predictor, run, item, classes, protocol.phrase, result)
    found = list(objects(label, list(classes), objects_mode))
    if protocol.kind == "box" and found:
        # every object of the slice in one decoder call
        boxes = np.stack(
            [box_from_mask(m, protocol.jitter, _seed(seed, item["case"], item["slice"], c)) for c, m in found]
        )
        masks = predictor.predict(boxes=boxes).masks[:, 0]
        for (class_id, _), box, prediction in zip(found, boxes, masks, strict=True):
            result.prompts.append(("box", box))
            result.pred[class_id] |= prediction
        return result

    def predict(clicks) -> np.ndarray:
        coords = np.array([[c.x, c.y] for c in clicks], np.float32)
        labels = np.array([int(c.positive) for c in clicks])
        return predictor.predict(points=coords, labels=labels).masks[0, 0]

    for class_id, mask in found:  # clicks: one object at a time (each next click depends on its own prediction)
        clicks, prediction = iterative_clicks(mask, predict, protocol.points)
        result.prompts.extend(("point", c) for c in clicks)
        result.pred[class_id] |= prediction
    return result


def _check_semantic(run: Run) -> None:
    if run.task != "semantic":
        raise ConfigError("the 'none' protocol needs a semantic model (e.g. trained with the samed recipe)")


def semantic_result(item: dict, labels: np.ndarray, run: Run, classes: Sequence[int]) -> SliceResult:
    """A slice's result from a semantic model's (H, W) output (0 background, k the run's k-th class)."""
    result = SliceResult(
        item["case"], item["slice"], item["image"], item["label"], {c: np.zeros(labels.shape, bool) for c in classes}
    )
    for k, c in enumerate(run.classes, start=1):
        if c in result.pred:
            result.pred[c] = labels == k
    return result


@dataclass
class Evaluation:
    """Rows per (unit, class), their aggregate, and the slice results kept for pictures."""

    protocol: str
    model: str
    rows: list[dict]
    summary: dict
    slices: list[SliceResult]

    def metrics_json(self) -> dict:
        return {
            **self.summary,
            "prompt": self.protocol,
            "model": self.model,
            "cases": len({r["case"] for r in self.rows}),
            "units": len({(r["case"], r["slice"]) for r in self.rows}),
            "empty_mask_conventions": EMPTY_MASK_CONVENTIONS,
        }


def evaluate_slices(
    run: Run,
    items: Sequence[dict],
    classes: dict[int, str],
    protocol: Protocol | str,
    objects_mode: str = "class",
    seed: int = 0,
    tolerance_mm: float = 2.0,
    device: str | torch.device | None = None,
    precision: str | None = None,
    progress: bool = True,
    keep_components: str = "all",
) -> Evaluation:
    """Score a model on 2D slices: every slice is a unit (metrics in 2D with its pixel spacing).

    ``items`` are preprocessed slices (``SliceDataset`` items: ``image`` in [0, 1], ``label``, ``case``, ``slice``,
    ``spacing``), fed to the model exactly as training feeds them. ``precision`` defaults to the run's;
    ``keep_components``: ``Predictor``'s (``prompt``: only the components a prompt touches).
    """
    kwargs = dict(objects_mode=objects_mode, seed=seed, tolerance_mm=tolerance_mm, device=device, precision=precision)
    kwargs["keep_components"] = keep_components
    return evaluate_slices_under(run, items, classes, [protocol], progress=progress, **kwargs)[0]


def evaluate_slices_under(
    run: Run,
    items: Sequence[dict],
    classes: dict[int, str],
    protocols: Sequence[Protocol | str],
    objects_mode: str = "class",
    seed: int = 0,
    tolerance_mm: float = 2.0,
    device: str | torch.device | None = None,
    precision: str | None = None,
    progress: bool = True,
    keep_components: str = "all",
) -> list[Evaluation]:
    """``evaluate_slices`` for several protocols at once, one ``Evaluation`` each, encoding every slice once."""
    from tqdm.auto import tqdm

    protocols = [parse_protocol(p) if isinstance(p, str) else p for p in protocols]
    predictor = Predictor.for_run(run, device=device, precision=precision, keep_components=keep_components)
    rows: list[list[dict]] = [[] for _ in protocols]
    kept = [PicturePool(seed) for _ in protocols]
    names = ", ".join(map(str, protocols))
    with torch.inference_mode():
        for item in tqdm(items, desc=f"evaluate {run.label} {names}", disable=not progress, unit="slice"):
            predictor.set_image(item["image"], preprocessed=True)
            for k, protocol in enumerate(protocols):
                result = predict_slice(predictor, run, item, list(classes), protocol, objects_mode, seed)
                dices = {}
                for class_id, name in classes.items():
                    metrics = binary_metrics(
                        result.pred[class_id], item["label"] == class_id, item["spacing"], tolerance_mm
                    )
                    rows[k].append({"case": item["case"], "slice": item["slice"], "class": name, **metrics})
                    dices[class_id] = metrics["dice"]
                kept[k].add(result, dices)
    return [
        Evaluation(str(p), run.label, r, aggregate(r, list(classes.values())), s.results())
        for p, r, s in zip(protocols, rows, kept, strict=True)
    ]


def evaluate_volumes(
    run: Run,
    slices,
    case_ids: Sequence[str],
    classes: dict[int, str],
    protocol: Protocol | str,
    objects_mode: str = "class",
    seed: int = 0,
    tolerance_mm: float = 2.0,
    device: str | torch.device | None = None,
    precision: str | None = None,
    progress: bool = True,
    predictor: SegmentationPredictor | None = None,
    finished_dir: Path | None = None,
    keep_components: str = "all",
    largest_component: Collection[int] | None = None,
) -> Evaluation:
    """Score whole volumes in 3D: slices are predicted one by one (prompted: only where an object exists to prompt
    on), stacked, and compared with the ground truth volume using the voxel spacing. ``predictor``: any backend's,
    made for ``run`` (``inference.load_predictor``); None: the torch ``Predictor`` of ``run`` on ``device`` at
    ``precision`` (default: the run's). Options, off by default: ``keep_components`` (``Predictor``'s; a given
    ``predictor`` applies its own) and ``largest_component``, the classes reduced to their largest 3D component
    (``components.keep_largest``).

    With ``finished_dir``, each volume's rows are written there atomically as soon as it is scored, and volumes
    found there are not scored again: a killed evaluation continues where it stopped (their pictures are not kept).
    """
    from tqdm.auto import tqdm

    protocol = parse_protocol(protocol) if isinstance(protocol, str) else protocol
    if predictor is None:
        predictor = Predictor.for_run(run, device=device, precision=precision, keep_components=keep_components)
    rows, kept = [], PicturePool(seed)
    # one pass over the slice index for all volumes (not one per volume: 1,000 volumes x 10^5 slices)
    by_case: dict[str, dict[int, int]] = {}
    wanted_classes = set(classes)
    labelled: dict[str, list[int]] = {}
    for i, (case, z, present) in enumerate(slices.slices):
        by_case.setdefault(case, {})[z] = i
        if wanted_classes & set(present):
            labelled.setdefault(case, []).append(z)
    for case_id in case_ids:
        done = finished_dir / f"{case_id}.json" if finished_dir is not None else None
        if done is not None and done.exists():
            rows.extend(json.loads(done.read_text()))
            continue
        image, label = slices.read_case(case_id)
        axis = slices.axis
        gt = np.moveaxis(label.array, axis, 0)
        pred = {c: np.zeros(gt.shape, bool) for c in classes}
        positions = list(range(gt.shape[0])) if protocol.kind == "none" else labelled.get(case_id, [])
        # prompted: slice by slice (each slice's prompts need its embedding); semantic: ``step`` slices per call
        step = default_batch_size(predictor.device) if protocol.kind == "none" else 1
        bar = tqdm(total=len(positions), desc=f"{run.label} {case_id} {protocol}", disable=not progress, unit="slice")
        with torch.inference_mode():
            for start in range(0, len(positions), step):
                items = [slices[by_case[case_id][z]] for z in positions[start : start + step]]
                if protocol.kind == "none":
                    _check_semantic(run)
                    along = [item["position"] for item in items]  # the slices' positions, as training's
                    outputs = predictor.semantic_batch([item["image"] for item in items], along)
                    results = [
                        semantic_result(it, out, run, list(classes)) for it, out in zip(items, outputs, strict=True)
                    ]
                else:
                    predictor.set_image(items[0]["image"], preprocessed=True)
                    results = [predict_slice(predictor, run, items[0], list(classes), protocol, objects_mode, seed)]
                for result in results:
                    for c in classes:
                        pred[c][result.slice] = result.pred[c]
                    kept.add(result, {c: slice_dice(result, c) for c in classes})
                bar.update(len(items))
        bar.close()
        spacing = (image.spacing[axis], *[s for k, s in enumerate(image.spacing) if k != axis])
        case_rows = []
        for class_id, name in classes.items():
            if largest_component and class_id in largest_component:
                pred[class_id] = largest_component_of(pred[class_id])
            metrics = binary_metrics(pred[class_id], gt == class_id, spacing, tolerance_mm)
            case_rows.append({"case": case_id, "slice": -1, "class": name, **metrics})
        rows.extend(case_rows)
        if done is not None:
            atomic_write_text(done, json.dumps(case_rows))
    return Evaluation(str(protocol), run.label, rows, aggregate(rows, list(classes.values())), kept.results())


def _finished_dir(out: str | Path, run: Run, protocol: Protocol, chosen: dict, options: dict) -> Path:
    """Where ``evaluate`` keeps finished volumes: keyed by everything that decides their rows, so a rerun with
    another model, checkpoint, protocol, seed or class set never reuses them."""
    manifest = run.manifest or {}  # a Manifest, or an ONNX export's manifest (a dict)
    facts = manifest if isinstance(manifest, dict) else vars(manifest)
    key = {
        "run": str(run.path or run.name),
        "step": facts.get("step"),
        "base": facts.get("base_sha256"),
        "blend": run.blend,
        "one_click_best": run.select_single_click,
        "protocol": str(protocol),
        "classes": sorted(chosen),
        **options,
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(out) / ".finished" / digest


class PicturePool:
    """What a report's pictures need of an evaluation, in memory that does not grow with the number of slices.

    Per class, the worst and the best slice by Dice are kept exactly; a seeded reservoir sample of ``size`` slice
    results stands in for the rest (the report's "median" picture is the median of the sample).
    """

    def __init__(self, seed: int = 0, size: int = 32) -> None:
        self.rng = np.random.default_rng(seed)
        self.size = size
        self.seen = 0
        self.sample: list[SliceResult] = []
        self.extremes: dict[tuple[int, str], tuple[float, SliceResult]] = {}

    def add(self, result: SliceResult, dices: dict[int, float]) -> None:
        self.seen += 1
        if len(self.sample) < self.size:
            self.sample.append(result)
        else:
            slot = int(self.rng.integers(self.seen))
            if slot < self.size:
                self.sample[slot] = result
        for class_id, score in dices.items():
            if math.isnan(score) or not (result.gt == class_id).any():
                continue
            worst, best = self.extremes.get((class_id, "worst")), self.extremes.get((class_id, "best"))
            if worst is None or score < worst[0]:
                self.extremes[(class_id, "worst")] = (score, result)
            if best is None or score > best[0]:
                self.extremes[(class_id, "best")] = (score, result)

    def results(self) -> list[SliceResult]:
        """The kept slice results, each once (sample first, then the extremes not in it)."""
        kept = {id(r): r for r in self.sample}
        for _, result in self.extremes.values():
            kept.setdefault(id(result), result)
        return list(kept.values())


def _gathered(evaluation: Evaluation, case_ids: Sequence[str], classes: dict[int, str], world: int) -> Evaluation:
    """Every rank's rows and pictures in one ``Evaluation``, rows in the single-process order (case, class)."""
    if world == 1:
        return evaluation
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, (evaluation.rows, evaluation.slices))
    position = {case: k for k, case in enumerate(case_ids)}
    rows = sorted((row for part_rows, _ in parts for row in part_rows), key=lambda row: position[row["case"]])
    kept = [result for _, part_slices in parts for result in part_slices]
    summary = aggregate(rows, list(classes.values()))
    return Evaluation(evaluation.protocol, evaluation.model, rows, summary, kept)


def evaluate(
    run: Run | str | Path | None,
    data: str | Path,
    prompt: Protocol | str = "point:1",
    baseline: bool = False,
    out: str | Path | None = None,
    objects_mode: str = "class",
    cases: Sequence[str] | None = None,
    classes: Sequence[int] | None = None,
    axis: int | None = None,
    seed: int = 0,
    tolerance_mm: float = 2.0,
    device: str | torch.device | None = None,
    precision: str | None = None,
    progress: bool = True,
    predictor: SegmentationPredictor | None = None,
    blend: float | None = None,
    keep_components: str = "all",
    largest_component: Collection[int] | str | None = None,
    memory: bool = False,
) -> dict:
    """Score a run (or a bare model name) on whole volumes of a dataset, optionally beside its un-adapted base model.

    Slices are cut along ``axis`` (default: the run's training axis, else the dataset's) and preprocessed with the
    dataset's preset, exactly as training did. ``device`` (default: CUDA when available) and ``precision`` (default:
    the run's) apply to both models.

    Under torchrun (``torchrun --nproc_per_node N -m -- samadapt.cli evaluate ...``) the volumes are shared out among
    the ranks and gathered into one report, written by rank 0. The baseline gets the same prompts from the same seed;
    a semantic or text-prompted run's baseline (the base model cannot segment without prompts, nor read text) gets
    one centre click per object (``point:1``). With ``out``, writes metrics.json, metrics.csv, overlays and
    report.md / report.html there. Returns the content of metrics.json (the baseline's under
    ``"baseline"``). ``predictor``: the one to score, on any backend (``inference.load_predictor``, which reads
    ``--backend``: an onnxruntime predictor of an export directory, or of a run exported on the fly); ``run`` is
    then its ``run`` (or None); the baseline runs on the same backend (``inference.baseline_predictor``). None: the
    torch predictor of ``run`` on ``device`` at ``precision``. ``blend``: the weight of the trained update when
    ``run`` is a path (``peft.blend``; None: the run's own).
    ``keep_components`` / ``largest_component``: the options of ``evaluate_volumes`` (both models; off by default;
    ``largest_component="all"``: every class scored; a given ``predictor`` applies its own ``keep_components``).
    One click alone is answered by each run's one-click rule (``Run.one_click``; ``selection.one_click_best``).
    ``interactive[:N]``: the interactive protocol (``eval.interactive``: a 3D box, then N corrective clicks, one
    process), its propagation with ``memory`` when asked.
    """
    from samadapt.data.datasets import SliceDataset, load_dataset
    from samadapt.eval.report import save_evaluation
    from samadapt.inference import baseline_predictor, load_predictor

    if predictor is None:
        predictor = load_predictor(run, device=device, precision=precision, blend=blend)
    elif run is not None and run is not predictor.run:
        raise ConfigError("give the run, or a predictor made for it (load_predictor), not two different ones")
    elif blend is not None:
        raise ConfigError("blend is fixed when the predictor is made: load_predictor(..., blend=)")
    run = predictor.run
    protocol = parse_protocol(prompt) if isinstance(prompt, str) else prompt
    axis = run.axis if axis is None else axis
    spec = load_dataset(data)
    slices = SliceDataset(spec, axis=axis)
    chosen = {c: n for c, n in spec.classes.items() if not run.classes or c in run.classes}
    if classes:
        unknown = sorted(set(classes) - set(spec.classes))
        if unknown:
            raise DataError(f"{spec.root}: classes {unknown} are not in dataset.json (it has {sorted(spec.classes)})")
        chosen = {c: spec.classes[c] for c in classes}
    case_ids = list(cases) if cases else [c.id for c in spec.cases]
    rank, world = distributed_context()  # under torchrun each rank scores every world-th volume
    shard = case_ids[rank::world]
    kwargs = dict(objects_mode=objects_mode, seed=seed, tolerance_mm=tolerance_mm, progress=progress and rank == 0)
    largest = sorted(chosen if largest_component == "all" else largest_component) if largest_component else None
    kwargs.update(keep_components=keep_components, largest_component=largest)
    options = dict(objects_mode=objects_mode, seed=seed, tolerance_mm=tolerance_mm, axis=slices.axis)
    options.update(keep_components=keep_components, largest_component=largest)
    if protocol.kind == "interactive":
        if world > 1:
            raise ConfigError("the interactive protocol runs in one process: start it without torchrun")
        if run.task == "semantic":
            raise ConfigError(f"{run.label} is a semantic run: it takes no box or click (use --prompt none)")
        options["memory"] = memory

    def score(what, protocol: Protocol, on: SegmentationPredictor):
        finished = _finished_dir(out, what, protocol, chosen, options) if out is not None else None
        if protocol.kind == "interactive":
            from samadapt.eval.interactive import evaluate_interactive

            args = dict(clicks=protocol.points, tolerance_mm=tolerance_mm, memory=memory, progress=progress)
            rows, summary = evaluate_interactive(what, slices, shard, chosen, on, finished_dir=finished, **args)
            return Evaluation(str(protocol), what.label, rows, summary, [])
        scored = evaluate_volumes(what, slices, shard, chosen, protocol, predictor=on, finished_dir=finished, **kwargs)
        return _gathered(scored, case_ids, chosen, world)

    evaluation = score(run, protocol, predictor)
    reference = None
    if baseline:
        # the base model reads no text and has no semantic head: it gets one centre click per object
        base_protocol = protocol if protocol.kind not in ("none", "text") else parse_protocol("point:1")
        with baseline_predictor(predictor) as base:
            reference = score(base.run, base_protocol, base)
    if out is not None and rank == 0:
        return save_evaluation(out, evaluation, reference)
    metrics = evaluation.metrics_json()
    if reference is not None:
        metrics["baseline"] = reference.metrics_json()
    return metrics
