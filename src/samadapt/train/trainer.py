"""One trainer for every recipe: prompted (binary, per object) or semantic (K + 1 classes) segmentation.

Habits of a real training tool: schedules stepped per optimiser step, bf16 / fp16 mixed precision, gradient
accumulation and checkpointing, validation with best / last checkpoints written atomically, exact resume, a metrics
CSV (and TensorBoard when installed), a loss-curve PNG, DistributedDataParallel through torchrun with only rank 0
writing, and a NaN / inf loss that stops the run while keeping the last good checkpoint.
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from samadapt.device import autocast, distributed_context, resolve_device
from samadapt.errors import TrainingError, TrainingInterruptedError
from samadapt.files import atomic_write_text
from samadapt.models.sam import takes_slice_position
from samadapt.peft import blended, save_adapter, set_depth
from samadapt.peft.inject import load_adapter_weights, train_mode
from samadapt.precision import resolve_precision
from samadapt.runs import Manifest, Run, RunLayout
from samadapt.train.checkpoints import (
    STATE,
    CheckpointStore,
    checkpoint_to_resume,
    loop_state,
    restore_loop_state,
    write_checkpoint,
)
from samadapt.train.config import TrainConfig
from samadapt.train.exemplars import write_exemplars
from samadapt.train.lock import RunLock
from samadapt.train.losses import SegmentationLoss
from samadapt.train.samples import PreparedSlice, add_corrective_clicks, draw_prompt_batch, semantic_targets
from samadapt.train.schedule import build_scheduler
from samadapt.train.step import optimizer_step
from samadapt.train.workers import die_with_parent

log = logging.getLogger(__name__)


class _StopSignals:
    """Within the block, SIGINT and SIGTERM only set ``signal`` (the loop checkpoints, then stops); the previous
    handlers come back afterwards. Outside the main thread (where handlers cannot be set) it does nothing."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass
class TrainResult:
    steps: int
    best_val_dice: float
    last_val_dice: float
    run_dir: Path
    history: list[dict]
    warnings: list[str] = field(default_factory=list)  # e.g. the all-background plateau (``collapse_warnings``)


class Trainer:
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
            with probability ``data.synthetic_share`` (``_pick``).
    """

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
        self.data = train_slices
        self.train_slices = getattr(train_slices, "infos", train_slices)
        wanted = set(classes)
        if not any(wanted & set(s.classes) for s in self.train_slices):
            raise TrainingError(f"no training slice contains any of the requested classes {sorted(wanted)}")
        self.config = config
        self.rank, self.world = distributed_context()
        self.device = resolve_device(config.train.device)
        self.model = model.to(self.device)
        self._batches: Iterator[list[PreparedSlice]] | None = None
        self.val_items = list(val_items)[: config.train.val_slices]
        self.classes = list(classes)
        self.run_dir = Path(run_dir)
        self.manifest = manifest
        self.layout = RunLayout(self.run_dir)
        self.checkpoints = self.layout.checkpoints
        self.semantic = config.task == "semantic"
        # text prompts: the run's phrase book, written into the manifest by ``fit_slices``
        self.phrase_book = _phrase_book(manifest) if config.prompt.uses_text else None
        self.loss_fn = SegmentationLoss(config.loss.ce, config.loss.dice, multiclass=self.semantic)
        iou_weight = 0.0 if self.semantic else config.loss.iou
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise TrainingError("the model has no trainable parameters: apply a PEFT method first")
        self.optimizer = self._build_optimizer()
        self.scheduler = build_scheduler(
            self.optimizer,
            config.train.steps,
            config.optim.schedule,
            warmup_steps=config.optim.warmup_steps,
            power=config.optim.poly_power,
            final_ratio=config.optim.final_lr_ratio,
        )
        # "auto": bf16 only where the device has native kernels (emulated bf16 on an AVX2 CPU is ~100x slower)
        self.precision = resolve_precision(config.train.precision, self.device)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise TrainingError("fp16 training needs a CUDA device; use bf16 or fp32 on the CPU")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        if config.train.grad_checkpointing and hasattr(self.model.image_encoder, "set_grad_checkpointing"):
            self.model.image_encoder.set_grad_checkpointing(True)
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
        self.step = 0
        self.loader_wait = 0.0  # seconds spent waiting for batches (the loader should never be the bottleneck)
        self.best_dice = -math.inf
        self.history: list[dict] = []

    # -- set-up ---------------------------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.device, self.precision)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config.optim
        if cfg.name == "sgd":
            return torch.optim.SGD(self.params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    # -- one step -------------------------------------------------------------------------------------------
    def _pick(self, count: int, rng: np.random.Generator) -> list[int]:
        """Slice indices for one micro-batch, class-balanced (``balanced_picks``): a quarter of the draws (when there
        are any) take a slice without target, the others a learned class uniformly and then a slice holding it.
        With synthetic slices, each draw first picks synthetic (probability ``data.synthetic_share``) or real."""
        if not self.synthetic:
            return draw_balanced(self._class_pools, count, rng)
        share = self.config.data.synthetic_share
        real_pools, synthetic_pools = self._class_pools, self._synthetic_pools
        picks = []
        for _ in range(count):
            synthetic = synthetic_pools is not None and rng.random() < share
            picks += draw_balanced(synthetic_pools if synthetic else real_pools, 1, rng)
        return picks

    @functools.cached_property
    def _class_pools(self) -> tuple[dict[int, list[int]], list[int]]:
        # built once: a draw must not scan every training slice (10^5 of them on a large dataset)
        real = self.train_slices[: len(self.train_slices) - self.synthetic]
        return class_pools([s.classes for s in real], self.classes)

    @functools.cached_property
    def _synthetic_pools(self) -> tuple[dict[int, list[int]], list[int]] | None:
        """``class_pools`` of the synthetic slices, as indices into all training slices; None if none holds a target."""
        start = len(self.train_slices) - self.synthetic
        found = [s.classes for s in self.train_slices[start:]]
        if not any(set(self.classes) & set(c) for c in found):
            return None
        holding, empty = class_pools(found, self.classes)
        return {c: [start + i for i in pool] for c, pool in holding.items()}, [start + i for i in empty]

    @functools.cached_property
    def _stack_starts(self) -> list[int]:
        """Start indices of the runs of ``train.depth_slices`` consecutive slices of one case whose middle holds a
        target (3D training), found once."""
        slices, depth = self.train_slices, self.config.train.depth_slices
        return [
            i
            for i in range(len(slices) - depth + 1)
            if len({s.case for s in slices[i : i + depth]}) == 1
            and [s.index for s in slices[i : i + depth]] == list(range(slices[i].index, slices[i].index + depth))
            and set(self.classes) & set(slices[i + depth // 2].classes)
        ]

    def picks_for(self, step: int, micro: int) -> list[int]:
        """The slices of micro-batch ``micro`` of step ``step``: a function of (seed, rank, step, micro) alone, so
        that loader workers can read ahead and a resumed run draws exactly what an uninterrupted one would."""
        rng = np.random.default_rng([self.config.train.seed, self.rank, step, micro, 1])
        depth = self.config.train.depth_slices
        if depth > 1:
            return self._pick_stacks(self.config.train.batch_size, depth, rng)
        return self._pick(self.config.train.batch_size, rng)

    def _loader(self) -> Iterator[list[PreparedSlice]]:
        """Batches from the current step on; worker processes read them ahead when slices come from disk."""
        accum = self.config.train.grad_accum
        order = (self.picks_for(step, micro) for step in itertools.count(self.step) for micro in range(accum))
        workers = self.config.data.workers if getattr(self.data, "lazy", False) else 0
        loader = DataLoader(
            self.data,
            batch_sampler=order,
            num_workers=workers,
            collate_fn=list,
            prefetch_factor=2 if workers else None,
            worker_init_fn=die_with_parent() if workers else None,
            pin_memory=self.device.type == "cuda",
        )
        return iter(loader)

    def _next_batch(self) -> list[PreparedSlice]:
        if self._batches is None:
            self._batches = self._loader()
        started = time.perf_counter()
        batch = next(self._batches)
        self.loader_wait += time.perf_counter() - started
        return batch

    def _pick_stacks(self, count: int, depth: int, rng: np.random.Generator) -> list[int]:
        """Start indices of ``count`` runs of ``depth`` consecutive slices of one case (3D training)."""
        starts = self._stack_starts
        if not starts:
            raise TrainingError(
                f"no run of {depth} consecutive labelled slices holding the target: lower train.depth_slices"
            )
        picks = []
        for _ in range(count):
            start = starts[int(rng.integers(len(starts)))]
            picks.extend(range(start, start + depth))
        return picks

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
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss.item()} at step {self.step + 1}; stopped. The last good checkpoint "
                        f"is kept in {self.layout.checkpoint('last')} (lower optim.lr or use train.precision=fp32)"
                    )
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

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _save(self, name: str, val_dice: float) -> None:
        """Write checkpoints/<name>/ (``CheckpointStore``: temporary folder, checksums, renames; ``last`` keeps its
        predecessor as ``previous``). A failed write stops the run with the earlier checkpoints intact."""
        if not self.is_writer:
            return
        manifest = {**self.manifest.to_dict(), "step": self.step, "val_dice": _finite_or_none(val_dice)}
        state = loop_state(self, best_dice=self.best_dice)

        def write(folder: Path) -> None:
            save_adapter(self.model, folder, manifest)
            torch.save(state, folder / STATE)

        write_checkpoint(CheckpointStore(self.checkpoints), name, self.step, write)
        self._saved_at = time.monotonic()

    def resume(self) -> bool:
        """Continue from the newest intact checkpoint (``last``, else ``previous``, checked against their checksums);
        returns whether there was one. Prints where it resumed from."""
        found = checkpoint_to_resume(CheckpointStore(self.checkpoints))
        if found is None:
            return False
        folder, _ = found
        load_adapter_weights(self.model, folder, self.manifest.base_sha256)
        state = restore_loop_state(self, folder)
        self._batches = None  # the loader starts again at the resumed step
        self.best_dice = state["best_dice"]
        if self.is_writer:
            print(f"resumed from {folder} at step {self.step}", flush=True)
            self._rewrite_log()
        return True

    # -- the loop -------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Train to ``train.steps`` (or stop early after ``stop_after`` steps of this call, for tests).

        The run directory is locked for the whole call (``RunLock``: a second job on it is refused). Checkpoints
        are written every ``train.checkpoint_every`` steps, at least every ``train.checkpoint_minutes``, at each
        validation and at the end. SIGINT / SIGTERM end the run gracefully: a checkpoint first, then
        ``TrainingInterruptedError``.
        """
        lock = RunLock(self.run_dir) if self.is_writer else None
        if lock is not None:
            lock.acquire()
        try:
            with _StopSignals() as stop:
                return self._fit(resume, stop_after, stop)
        finally:
            self._batches = None  # stops the loader's worker processes
            if lock is not None:
                lock.release()

    def _fit(self, resume: bool, stop_after: int | None, stop: _StopSignals) -> TrainResult:
        cfg = self.config.train
        if resume:
            self.resume()
        if self.is_writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.config.save(self.layout.config)
            write_exemplars(self.layout.exemplars, self.train_slices, self.classes, self.synthetic, self.config)
        writer = self._tensorboard()
        last_dice = float("nan")
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.is_writer, desc="train", unit="step")
        started, steps_this_call = time.perf_counter(), 0
        self._saved_at = time.monotonic()
        while self.step < cfg.steps and (stop_after is None or steps_this_call < stop_after):
            waited = self.loader_wait
            row = self.train_step()
            row["loader_seconds"] = self.loader_wait - waited
            steps_this_call += 1
            row["seconds_per_step"] = (time.perf_counter() - started) / steps_this_call
            at_end = self.step == cfg.steps
            self.history.append(row)  # before any checkpoint, so that a resumed history has this row
            validate = (cfg.val_every and self.step % cfg.val_every == 0) or at_end
            if validate:
                last_dice = row["val_dice"] = self.validate()
                if not math.isnan(last_dice) and last_dice > self.best_dice:
                    self.best_dice = last_dice
                    self._save("best", last_dice)
            periodic = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
            overdue = time.monotonic() - self._saved_at >= 60 * cfg.checkpoint_minutes
            if validate or periodic or overdue or stop.signal:
                self._save("last", last_dice)
            self._log_row(row, writer)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", s_step=f"{row['seconds_per_step']:.2f}")
            if stop.signal:
                bar.close()
                raise TrainingInterruptedError(
                    f"stopped by {stop.name} at step {self.step}; checkpoint saved in {self.layout.checkpoint('last')} "
                    "(continue with --resume)"
                )
        bar.close()
        if self.is_writer and not (self.layout.checkpoint("best")).exists() and (self.layout.checkpoint("last")).exists():
            shutil.copytree(self.layout.checkpoint("last"), self.layout.checkpoint("best"))  # no validation set: best = last
        if self.is_writer and self.step == cfg.steps:
            self._plot()
        self.warnings = collapse_warnings(self)  # loud on the all-background plateau (warnings.json)
        return TrainResult(self.step, self.best_dice, last_dice, self.run_dir, self.history, self.warnings)

    def _tensorboard(self):
        if not self.is_writer:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional: the CSV log is always written
            return None
        return SummaryWriter(str(self.layout.tensorboard))

    _LOG_FIELDS = ("step", "loss", "lr", "val_dice", "seconds_per_step", "loader_seconds")

    def _log_row(self, row: dict, writer) -> None:
        if not self.is_writer:
            return
        path = self.layout.metrics_csv
        new = not path.exists() or self.step == 1
        with path.open("w" if new else "a", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=self._LOG_FIELDS, extrasaction="ignore")
            if new:
                out.writeheader()
            out.writerow(row)
        if writer is not None:
            for key in ("loss", "lr", "val_dice"):
                if key in row:
                    writer.add_scalar(key, row[key], row["step"])

    def _rewrite_log(self) -> None:
        """metrics.csv as of the resumed step: rows logged after that checkpoint (by a killed job) are dropped."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.layout.metrics_csv.open("w", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=self._LOG_FIELDS, extrasaction="ignore")
            out.writeheader()
            out.writerows(self.history)

    def _plot(self) -> None:
        try:
            from samadapt.eval.figures import save_loss_curve
        except ImportError:
            return
        save_loss_curve(self.history, self.layout.loss_curve)


class LossForward(nn.Module):
    """The differentiable part of a training step, as one module so that DDP can wrap it.

    Prompted task: encode once, decode, then ``rounds`` decoder-only rounds on the same embedding, each adding a
    click in the error region of the previous prediction (MSA's iterative training); the loss is the mean over
    rounds. Semantic task (no prompts): decode all class masks at once.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        rounds: int,
        rng: np.random.Generator,
        iou_weight: float = 0.0,
        multimask: bool = False,
    ) -> None:
        super().__init__()
        self.multimask = multimask
        self.model = model
        self.loss_fn = loss_fn
        self.rounds = rounds
        self.rng = rng
        self.iou_weight = iou_weight

    def _loss(self, logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mask loss, plus (prompted task) the IoU head's MSE against the true IoU of the thresholded mask."""
        upsampled = _upsample(logits, targets.shape[-1])
        loss = self.loss_fn(upsampled, targets)
        if self.iou_weight:
            loss = loss + self.iou_weight * F.mse_loss(iou_pred.float(), mask_iou(upsampled.detach() > 0, targets > 0))
        return loss

    def _best_of_candidates(
        self, logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's loss for an ambiguous prompt: per sample, only the candidate mask closest to the target (lowest
        mask loss) is penalised, the others stay free to answer other readings of the click; the IoU head learns
        every candidate's true IoU, which is what ``Predictor`` selects by. Returns the loss and the chosen
        candidates' logits (B, 1, h, w) (the mask prompt of a next round)."""
        upsampled = _upsample(logits, targets.shape[-1])
        count, candidates = logits.shape[:2]
        per = torch.stack(
            [
                torch.stack(
                    [self.loss_fn(upsampled[i : i + 1, k : k + 1], targets[i : i + 1]) for k in range(candidates)]
                )
                for i in range(count)
            ]
        )
        best = per.detach().argmin(1)
        rows = torch.arange(count, device=logits.device)
        loss = per[rows, best.to(logits.device)].mean()
        if self.iou_weight:
            loss = loss + self.iou_weight * F.mse_loss(iou_pred.float(), mask_iou(upsampled.detach() > 0, targets > 0))
        return loss, logits[rows, best][:, None]

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        box_rows: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        slice_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeddings = self.model.encode_image(images)
        if box_rows is None:
            return self._decode_loss(embeddings, targets, points, boxes, text, slice_position)
        # mixed prompts: the box samples and the click samples decoded apart, the loss their sample-weighted mean
        loss = embeddings.new_zeros(())
        for rows, use_box in ((box_rows.nonzero()[:, 0], True), ((~box_rows).nonzero()[:, 0], False)):
            if len(rows):
                rows = rows.to(images.device)
                group_points = None if use_box else tuple(t[rows] for t in points)
                group_boxes = boxes[rows] if use_box else None
                part = self._decode_loss(embeddings[rows], targets[rows], group_points, group_boxes)
                loss = loss + part * len(rows) / len(box_rows)
        return loss

    def _decode_loss(
        self,
        embeddings: torch.Tensor,
        targets: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        text: torch.Tensor | None = None,
        slice_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        size = targets.shape[-1]
        # one click alone is ambiguous: as SAM, train its three candidates (``Predictor`` keeps the best-rated one)
        single = self.multimask and boxes is None and text is None and points is not None and points[1].shape[1] == 1
        logits, iou_pred = self.model.decode(
            embeddings, points, boxes, multimask_output=single, text=text, slice_position=slice_position
        )
        if points is None and boxes is None and text is None:
            return self.loss_fn(_upsample(logits, size), targets)
        if single:
            loss, logits = self._best_of_candidates(logits, iou_pred, targets)
        else:
            loss = self._loss(logits, iou_pred, targets)
        for _ in range(self.rounds):
            with torch.no_grad():
                predictions = (_upsample(logits, size) > 0).cpu()
            cpu_points = None if points is None else tuple(t.cpu() for t in points)
            points = tuple(
                t.to(embeddings.device) for t in add_corrective_clicks(cpu_points, targets.cpu(), predictions, self.rng)
            )
            logits, iou_pred = self.model.decode(embeddings, points, boxes, mask_inputs=logits.detach(), text=text)
            loss = loss + self._loss(logits, iou_pred, targets)
        return loss / (1 + self.rounds)


def slice_positions(batch: Sequence[PreparedSlice]) -> torch.Tensor:
    """(B,) float32 positions of a batch's slices along their axes, for a model with ``model.slice_position``.

    Raises:
        TrainingError: a slice carries no position (an item without ``position``: give ``SliceDataset`` items).
    """
    missing = [s.case or "?" for s in batch if s.position is None]
    if missing:
        raise TrainingError(
            f"model.slice_position needs each slice's position, and slices of {sorted(set(missing))} carry none "
            "(items need a 'position', as SliceDataset items have)"
        )
    return torch.tensor([s.position for s in batch], dtype=torch.float32)


def _phrase_book(manifest: Manifest):
    from samadapt.text.phrases import PhraseBook

    if not manifest.text:
        raise TrainingError("text prompts need the run's phrase book in the manifest (fit_slices writes it)")
    return PhraseBook.from_dict(manifest.text)


def _upsample(logits: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of boolean (B, K, H, W) masks per (sample, mask): (B, K) float; 1.0 when both are empty (a correct
    "nothing here" answer), the target the IoU head learns."""
    inter = (pred & target).flatten(2).sum(-1).float()
    union = (pred | target).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def balanced_picks(
    slice_classes: Sequence[Sequence[int]],
    classes: Sequence[int],
    count: int,
    rng: np.random.Generator,
    empty_share: float = 0.25,
) -> list[int]:
    """``count`` slice indices drawn class-balanced: with probability ``empty_share`` (when such slices exist) a
    slice holding none of ``classes``; otherwise a class uniformly among the learned classes that some slice holds,
    then uniformly a slice holding it. A class present in one slice out of a hundred is drawn as often as one present
    in all of them (uniform slice draws would almost never show it, and a few labelled slices with many small classes
    then settle on the classes they see most, or on background alone).

    Args:
        slice_classes: the classes present in each training slice.
        classes: the learned class ids.
    """
    return draw_balanced(class_pools(slice_classes, classes), count, rng, empty_share)


def class_pools(
    slice_classes: Sequence[Sequence[int]], classes: Sequence[int]
) -> tuple[dict[int, list[int]], list[int]]:
    """For ``balanced_picks``: the slices holding each learned class, and the slices holding none.

    Raises:
        TrainingError: no slice holds any of ``classes``.
    """
    wanted = set(classes)
    holding: dict[int, list[int]] = {}
    empty = []
    for i, present in enumerate(slice_classes):
        mine = wanted & set(present)
        if not mine:
            empty.append(i)
        for c in mine:
            holding.setdefault(c, []).append(i)
    if not holding:
        raise TrainingError(f"no training slice contains any of the requested classes {sorted(wanted)}")
    return holding, empty


def draw_balanced(
    pools: tuple[dict[int, list[int]], list[int]], count: int, rng: np.random.Generator, empty_share: float = 0.25
) -> list[int]:
    """``count`` draws from ``class_pools``: an empty slice with probability ``empty_share``, else a class, then a
    slice holding it."""
    holding, empty = pools
    order = sorted(holding)
    picks = []
    for _ in range(count):
        if empty and rng.random() < empty_share:
            picks.append(int(empty[int(rng.integers(len(empty)))]))
            continue
        pool = holding[order[int(rng.integers(len(order)))]]
        picks.append(int(pool[int(rng.integers(len(pool)))]))
    return picks


# why a prompt-free run may find nothing (docs/accuracy.md, semantic half), said with its warnings
SEMANTIC_HINT = (
    "; prompt-free, a class is recognised by its look alone: where its look changes between cases (organ, modality, "
    "scanner) or it covers a few pixels, label slices of more cases, or use a prompted recipe (cheap-lunch)"
)


def collapse_warnings(trainer: Trainer, probe_slices: int = 4) -> list[str]:
    """Loud checks at the end of a run for the all-background plateau; returns the warnings (also logged at WARNING
    and, on the writing rank, written to ``run_dir/warnings.json`` with the checks' numbers).

    - every validation Dice of the run is 0 (validation ran at least once);
    - on up to ``probe_slices`` training slices holding a learned class, the model predicts nothing: semantic, the
      argmax is background everywhere; prompted, a centre click on each object (text runs: its class name) gives an
      empty mask. The model fails on the very slices it was trained on: the run ended on the plateau, whatever the
      loss says;
    - prompted runs with held-out slices: it predicts something on its training slices but nothing on up to
      ``probe_slices`` held-out ones (a text run that learnt its slices by heart, issue 30).

    The probes ask the model a user gets: at the run's ``peft.blend``.
    """
    found: list[str] = []
    facts: dict = {}
    dices = [row["val_dice"] for row in trainer.history if "val_dice" in row and math.isfinite(row["val_dice"])]
    if dices and max(dices) == 0.0:
        found.append(
            f"validation Dice stayed at 0 in all {len(dices)} validations" + (SEMANTIC_HINT if trainer.semantic else "")
        )
    wanted = set(trainer.classes)
    holding = [i for i, s in enumerate(trainer.train_slices) if wanted & set(s.classes)][:probe_slices]
    source = getattr(trainer, "data", trainer.train_slices)  # prepared slices (``train_slices`` may be infos)
    probes = [source[i] for i in holding]
    if probes and trainer.config.train.depth_slices == 1:
        from samadapt.train.samples import prepare_slice

        held = [] if trainer.semantic else [it for it in trainer.val_items if wanted & set(np.unique(it["label"]))]
        held = [prepare_slice(it, trainer.model.img_size) for it in held[:probe_slices]]
        trainer.model.eval()
        with torch.no_grad(), trainer._autocast(), blended(trainer.model, trainer.config.peft.blend):
            predicted = _foreground(trainer, probes)
            held_out = _foreground(trainer, held) if held else None
        train_mode(trainer.model)
        facts["foreground_pixels_on_training_slices"] = predicted
        if predicted == 0:
            found.append(
                f"the model predicts only background on {len(probes)} of its own training slices (all-background "
                "plateau): try a lower optim.lr, more steps, or more exemplars"
                + (SEMANTIC_HINT if trainer.semantic else "")
            )
        if held_out is not None:
            facts["foreground_pixels_on_held_out_slices"] = held_out
            if held_out == 0 and predicted > 0:
                found.append(
                    f"the model predicts nothing on {len(held)} held-out slices holding a learned class, although it "
                    "does on its training slices: it learnt them by heart; label more slices, or for text prompts "
                    "train with clicks too (prompt.kind=text-mixed)"
                )
    losses = [row["loss"] for row in trainer.history]
    if found and len(losses) >= 4:
        facts["first_loss"], facts["last_loss"] = float(np.mean(losses[:2])), float(np.mean(losses[-2:]))
    for message in found:
        log.warning("%s: %s", trainer.run_dir, message)
    if trainer.is_writer and trainer.run_dir.exists():
        atomic_write_text(trainer.layout.warnings, json.dumps({"warnings": found, **facts}, indent=2))
    return found


def _foreground(trainer: Trainer, items: Sequence[PreparedSlice]) -> int:
    """Foreground pixels the model predicts on prepared slices: semantic, the argmax; prompted, per learned class
    present, its class name (text runs) or one centre click answered as the run trained (``one_click_best``)."""
    from samadapt.prompts import centre_click
    from samadapt.selection import best_candidate, one_click_best

    predicted = 0
    select = one_click_best(trainer.manifest.to_dict())
    for item in items:
        embedding = trainer.model.encode_image(item.image[None].to(trainer.device))
        if trainer.semantic:
            position = slice_positions([item]) if takes_slice_position(trainer.model) else None
            logits, _ = trainer.model.decode(embedding, slice_position=position)
            predicted += int((logits.argmax(1) > 0).sum())
            continue
        for class_id in sorted(set(trainer.classes) & set(item.classes)):
            if getattr(trainer, "phrase_book", None) is not None:  # a text run: its class name, as text:name asks
                from samadapt.text.encoder import embed_phrases
                from samadapt.text.phrases import plain_name

                name = plain_name(trainer.phrase_book.for_class(class_id).name)
                logits, _ = trainer.model.decode(embedding, text=embed_phrases([name], trainer.device))
                predicted += int((logits > 0).sum())
                continue
            click = centre_click(item.label == class_id)
            coords = torch.tensor([[[click.x, click.y]]], dtype=torch.float32, device=trainer.device)
            labels = torch.ones(1, 1, dtype=torch.long, device=trainer.device)
            logits, scores = trainer.model.decode(embedding, (coords, labels), multimask_output=select)
            if select:
                logits, _ = best_candidate(logits, scores)
            predicted += int((logits > 0).sum())
    return predicted
