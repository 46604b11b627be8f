"""The fine-tuning trainer, for every recipe: prompted (binary, per object) or semantic (K + 1 classes) segmentation.

It supplies one step (``grad_accum`` micro-batches drawn by ``SliceDraws``, augmented, prompted, through
``LossForward``), its validation (``evaluate_slices``: the number ``samadapt evaluate`` gives) and its checkpoints'
weights (the adapter files); ``TrainingLoop`` does the rest: bf16 / fp16 mixed precision, schedules stepped per
optimiser step, best / last checkpoints sealed, exact resume, the metrics log, DistributedDataParallel through torchrun
with only rank 0 writing, and a NaN / inf loss that stops the run while keeping the last good checkpoint.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from samadapt.device import distributed_context
from samadapt.errors import TrainingError
from samadapt.models.sam import takes_slice_position
from samadapt.peft import blended, save_adapter, set_depth
from samadapt.peft.inject import load_adapter_weights, train_mode
from samadapt.runs import Manifest, Run
from samadapt.train.config import TrainConfig
from samadapt.train.diagnostics import collapse_warnings
from samadapt.train.exemplars import write_exemplars
from samadapt.train.forward import LossForward, slice_positions
from samadapt.train.loop import TrainingLoop
from samadapt.train.losses import SegmentationLoss
from samadapt.train.samples import PreparedSlice, draw_prompt_batch, semantic_targets
from samadapt.train.sampling import SliceDraws
from samadapt.train.step import optimizer_step


@dataclass
class TrainResult:
    steps: int
    best_val_dice: float
    last_val_dice: float
    run_dir: Path
    history: list[dict]
    warnings: list[str] = field(default_factory=list)  # e.g. the all-background plateau (``collapse_warnings``)


class Trainer(TrainingLoop):
    """Trains the PEFT parameters of ``model`` (already adapted and frozen by ``apply_peft``).

    Args:
        config: the run's configuration.
        model: a ``Sam`` with PEFT applied.
        train_slices: a ``TrainingSlices`` (slices read and put on the model-input grid per batch, by DataLoader
            workers when they come from disk), or a list of ``PreparedSlice`` (``prepare_slices``).
        val_items: held-out preprocessed slices (``SliceDataset`` items), scored by ``evaluate_slices``: the same
            inputs, prompts and metric as ``samadapt evaluate``.
        classes: dataset class ids learned, in output order for the semantic task.
        run_dir: where config, logs, checkpoints and the loss curve go.
        manifest: what the saved adapters will say of themselves (base model and checksum, classes, preprocessing).
        synthetic: how many of the training slices, at the end of ``train_slices``, are synthetic; draws take them
            with probability ``data.synthetic_share`` (``SliceDraws``).
    """

    log_fields = ("step", "loss", "lr", "val_dice", "seconds_per_step", "loader_seconds")
    validates = True

    def __init__(
        self,
        config: TrainConfig,
        model: nn.Module,
        train_slices: Sequence[PreparedSlice],
        val_items: Sequence[dict],
        classes: Sequence[int],
        run_dir: str | Path,
        manifest: Manifest,
        synthetic: int = 0,
    ) -> None:
        if not len(train_slices):
            raise TrainingError("no training slices: the dataset or the exemplar selection is empty")
        if not 0 <= synthetic < len(train_slices):
            raise TrainingError(f"{synthetic} synthetic slices of {len(train_slices)}: some must be real")
        self.synthetic = synthetic
        # what sampling reads (case, position, classes); images are loaded per batch from ``self.data``
        self.data = self.batch_data = train_slices
        self.train_slices = getattr(train_slices, "infos", train_slices)
        wanted = set(classes)
        if not any(wanted & set(s.classes) for s in self.train_slices):
            raise TrainingError(f"no training slice contains any of the requested classes {sorted(wanted)}")
        super().__init__(config, model, run_dir, *distributed_context())
        self.val_items = list(val_items)[: config.train.val_slices]
        self.classes = list(classes)
        self.manifest = manifest
        self.semantic = config.task == "semantic"
        # text prompts: the run's phrase book, written into the manifest by ``fit_slices``
        self.phrase_book = _phrase_book(manifest) if config.prompt.uses_text else None
        self.loss_fn = SegmentationLoss(config.loss.ce, config.loss.dice, multiclass=self.semantic)
        iou_weight = 0.0 if self.semantic else config.loss.iou
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("the model has no trainable parameters: apply a PEFT method first")
        self._set_up_optimisation(params)
        self.draws = SliceDraws(
            self.train_slices,
            self.classes,
            config.train.seed,
            self.rank,
            config.train.batch_size,
            config.train.depth_slices,
            synthetic,
            config.data.synthetic_share,
        )
        # each rank draws its own samples from its own stream; together they form the global batch
        self.rng = np.random.default_rng([config.train.seed, self.rank])
        self.forward: nn.Module = LossForward(
            self.model, self.loss_fn, config.prompt.iterative_rounds, self.rng, iou_weight, config.prompt.multimask
        )
        if self.world > 1:
            self.forward = nn.parallel.DistributedDataParallel(
                self.forward, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        torch.manual_seed(config.train.seed)

    # -- batches --------------------------------------------------------------------------------------------
    def picks_for(self, step: int, micro: int) -> list[int]:
        """The slices of micro-batch ``micro`` of step ``step``: a function of (seed, rank, step, micro) alone, so
        that loader workers can read ahead and a resumed run draws exactly what an uninterrupted one would."""
        return self.draws.picks(step, micro)

    def batch_order(self, start: int) -> Iterator[list[int]]:
        accum = self.config.train.grad_accum
        return (self.picks_for(step, micro) for step in itertools.count(start) for micro in range(accum))

    def loader_workers(self) -> int:
        # in-memory slices need no worker processes
        return self.config.data.workers if getattr(self.data, "lazy", False) else 0

    # -- one step -------------------------------------------------------------------------------------------
    def _micro_batch_loss(self) -> torch.Tensor:
        batch = self._next_batch()
        if self.config.train.depth_slices > 1:
            set_depth(self.model, self.config.train.depth_slices)
        if self.semantic:
            return self._semantic_loss(batch)
        return self._prompt_loss(batch)

    def _semantic_loss(self, batch: list[PreparedSlice]) -> torch.Tensor:
        """Semantic loss of one micro-batch. Augmentation keeps the orientation (``train.augment.augment``: a small
        affine and intensity changes, no 90-degree turns or flips): a class may be defined by its side (left / right
        kidney, a hemisphere), and a turned slice shows it where another class lives (issue 18)."""
        from samadapt.train.augment import augment as augment_slice

        pairs = [(s.image, s.label) for s in batch]
        if self.config.data.augment:
            pairs = [augment_slice(image, label, self.rng) for image, label in pairs]
        images = torch.stack([image for image, _ in pairs]).to(self.device)
        targets = semantic_targets([label for _, label in pairs], self.classes).to(self.device)
        positions = slice_positions(batch) if takes_slice_position(self.model) else None
        with self._autocast():
            return self.forward(images, targets, slice_position=positions)

    def _prompt_loss(self, picks: list[PreparedSlice]) -> torch.Tensor:
        cfg = self.config
        kind = cfg.prompt.kind
        if kind == "text-mixed":
            kind = ("text", "point", "box", "text+point")[int(self.rng.integers(4))]
        augment = cfg.data.augment and cfg.train.depth_slices == 1
        if kind.startswith("text"):
            from samadapt.train.text_samples import draw_text_batch

            book = self.phrase_book
            batch = draw_text_batch(picks, range(len(picks)), self.classes, book, cfg.prompt, kind, self.rng, augment)
        else:  # "mixed" is drawn per object inside (prompt.box_share)
            batch = draw_prompt_batch(picks, range(len(picks)), self.classes, cfg.prompt, kind, self.rng, augment)
        points = tuple(t.to(self.device) for t in batch.points) if batch.points is not None else None
        boxes = batch.boxes.to(self.device) if batch.boxes is not None else None
        text = None
        if batch.texts:
            from samadapt.text.encoder import embed_phrases

            text = embed_phrases(batch.texts, self.device)  # frozen encoder, cached per phrase
        with self._autocast():
            images, targets = batch.images.to(self.device), batch.targets.to(self.device)
            return self.forward(images, targets, points, boxes, batch.box_rows, text)

    def train_step(self) -> dict:
        """One optimiser step over ``grad_accum`` micro-batches; returns the logged values."""
        train_mode(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        accum = self.config.train.grad_accum
        total = 0.0
        for micro in range(accum):
            sync = nullcontext() if micro == accum - 1 or self.world == 1 else self.forward.no_sync()
            with sync:
                loss = self._micro_batch_loss()
                self._check_finite(loss)
                self.scaler.scale(loss / accum).backward()
            total += loss.item() / accum
        lr = optimizer_step(self, self.params, self.config.train.max_grad_norm)
        return {"step": self.step, "loss": total, "lr": lr}

    # -- validation -----------------------------------------------------------------------------------------
    def validate(self) -> float:
        """Mean Dice on the held-out slices, computed by ``evaluate_slices`` (the number ``samadapt evaluate`` gives):
        centre click (or tight box) per object, or the semantic argmax; NaN without held-out slices."""
        from samadapt.eval.evaluate import evaluate_slices

        if not self.val_items:
            return float("nan")
        set_depth(self.model, None if self.config.train.depth_slices > 1 else 1)
        classes = {c: self.manifest.classes.get(c, str(c)) for c in self.classes}
        task = "semantic" if self.semantic else "prompt"
        run = Run(self.model, self.layout.root.name, task, classes, self.manifest)
        protocol = "none" if self.semantic else ("box" if self.config.prompt.kind == "box" else "point:1")
        if self.config.prompt.uses_text:
            protocol = "text:name"  # not the held-out phrases: they must not choose the best checkpoint
        with blended(self.model, self.config.peft.blend):  # the model a user of this run gets (peft.blend)
            evaluation = evaluate_slices(
                run,
                self.val_items,
                classes,
                protocol,
                objects_mode=self.config.prompt.objects,
                seed=self.config.train.seed,
                device=self.device,
                precision=self.precision,
                progress=False,
            )
        return float(evaluation.summary["mean_dice"])

    # -- checkpoints and result -----------------------------------------------------------------------------
    def _write_weights(self, folder: Path, val_dice: float) -> None:
        manifest = {**self.manifest.to_dict(), "step": self.step, "val_dice": _finite_or_none(val_dice)}
        save_adapter(self.model, folder, manifest)

    def _load_weights(self, folder: Path) -> None:
        load_adapter_weights(self.model, folder, self.manifest.base_sha256)

    def _record_run(self) -> None:
        write_exemplars(self.layout.exemplars, self.train_slices, self.classes, self.synthetic, self.config)

    def _result(self, last_dice: float) -> TrainResult:
        self.warnings = collapse_warnings(self)  # loud on the all-background plateau (warnings.json)
        return TrainResult(self.step, self.best_dice, last_dice, self.run_dir, self.history, self.warnings)


def _phrase_book(manifest: Manifest):
    from samadapt.text.phrases import PhraseBook

    if not manifest.text:
        raise TrainingError("text prompts need the run's phrase book in the manifest (fit_slices writes it)")
    return PhraseBook.from_dict(manifest.text)


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
