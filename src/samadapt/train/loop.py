"""The one training loop: fine-tuning (``train.trainer.Trainer``) and pre-training (``pretrain.trainer.Pretrainer``)
supply their step, their validation and what their checkpoints hold; the loop owns the rest.

What the loop owns: the run lock (one job per run directory), SIGINT / SIGTERM (a checkpoint, then
``TrainingInterruptedError``), the checkpoint cadence through ``CheckpointStore`` (``last`` every
``train.checkpoint_every`` steps, at least every ``train.checkpoint_minutes``, at each validation and at the end;
``best`` at each better validation Dice, or, in a run without a validation score, a sealed copy of ``last``), exact
resume from the newest intact checkpoint, the optimiser and its schedule, mixed precision, the batch loader (worker
processes read ahead from the step on) and the metrics log (``metrics.csv``, TensorBoard when installed, a loss curve
at the end). Under torchrun only rank 0 writes.
"""

from __future__ import annotations

import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from samadapt.device import autocast, resolve_device
from samadapt.errors import TrainingError, TrainingInterruptedError
from samadapt.precision import resolve_precision
from samadapt.runs import RunLayout
from samadapt.train.checkpoints import (
    SEAL,
    STATE,
    CheckpointStore,
    checkpoint_to_resume,
    loop_state,
    restore_loop_state,
    write_checkpoint,
)
from samadapt.train.lock import RunLock
from samadapt.train.metrics_log import MetricsLog
from samadapt.train.schedule import build_scheduler
from samadapt.train.workers import die_with_parent


class StopSignals:
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

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class TrainingLoop:
    """The loop around a subclass's step.

    A subclass sets ``rng`` (the numpy generator every draw of its step uses), calls ``_set_up_optimisation`` with
    its trainable parameters, and supplies:

    - ``train_step()``: one optimiser step, returning the row to log (``step``, ``loss``, ``lr``, ...);
    - ``validate()`` (with ``validates = True``): a score where higher is better, NaN when there is nothing to score;
    - ``_write_weights(folder, val_dice)`` / ``_load_weights(folder)``: what a checkpoint holds besides the loop state;
    - ``batch_data``, ``collate``, ``loader_workers()`` and ``batch_order(start)``: what the loader reads;
    - ``_result(last_dice)``: what ``fit`` returns; ``progress(row)``: the progress bar's figures; ``_record_run()``:
      what the run directory records besides ``config.yaml``.

    ``config`` has ``train`` (steps, seed, device, precision, checkpoint_every, checkpoint_minutes, max_grad_norm,
    grad_checkpointing, and ``val_every`` when it validates), ``optim`` and ``save(path)``.
    """

    log_fields: tuple[str, ...] = ("step", "loss", "lr", "seconds_per_step", "loader_seconds")
    name = "train"  # the progress bar's label
    validates = False
    rng = None
    collate: Callable = list

    def __init__(self, config, model: nn.Module, run_dir: str | Path, rank: int = 0, world: int = 1) -> None:
        self.config = config
        self.rank, self.world = rank, world
        self.device = resolve_device(config.train.device)
        self.model = model.to(self.device)
        self.run_dir = Path(run_dir)
        self.layout = RunLayout(self.run_dir)
        self.checkpoints = self.layout.checkpoints
        self.step = 0
        self.best_dice = -math.inf
        self.history: list[dict] = []
        self.loader_wait = 0.0  # seconds spent waiting for batches (the loader should never be the bottleneck)
        self._batches: Iterator | None = None

    def _set_up_optimisation(self, params: Sequence[nn.Parameter]) -> None:
        """The optimiser and its schedule over ``params``, the precision and the gradient scaler."""
        cfg = self.config.optim
        self.params = list(params)
        if cfg.name == "sgd":
            self.optimizer = torch.optim.SGD(
                self.params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = build_scheduler(
            self.optimizer,
            self.config.train.steps,
            cfg.schedule,
            warmup_steps=cfg.warmup_steps,
            power=cfg.poly_power,
            final_ratio=cfg.final_lr_ratio,
        )
        # "auto": bf16 only where the device has native kernels (emulated bf16 on an AVX2 CPU is ~100x slower)
        self.precision = resolve_precision(self.config.train.precision, self.device)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise TrainingError("fp16 training needs a CUDA device; use bf16 or fp32 on the CPU")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        if self.config.train.grad_checkpointing and hasattr(self.model.image_encoder, "set_grad_checkpointing"):
            self.model.image_encoder.set_grad_checkpointing(True)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def _autocast(self):
        return autocast(self.device, self.precision)

    # -- supplied by a subclass -----------------------------------------------------------------------------
    def train_step(self) -> dict:
        raise NotImplementedError

    def validate(self) -> float:
        return float("nan")

    def _write_weights(self, folder: Path, val_dice: float) -> None:
        raise NotImplementedError

    def _load_weights(self, folder: Path) -> None:
        raise NotImplementedError

    def batch_order(self, start: int) -> Iterator[list[int]]:
        raise NotImplementedError

    def loader_workers(self) -> int:
        return self.config.data.workers

    def progress(self, row: dict) -> dict[str, str]:
        return {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}", "s_step": f"{row['seconds_per_step']:.2f}"}

    def _result(self, last_dice: float):
        raise NotImplementedError

    def _record_run(self) -> None:
        """Files the run directory records once per call beside ``config.yaml`` (on the writing rank)."""

    # -- batches --------------------------------------------------------------------------------------------
    def _loader(self) -> Iterator:
        """Batches from the current step on; worker processes read them ahead when there are workers."""
        workers = self.loader_workers()
        loader = DataLoader(
            self.batch_data,
            batch_sampler=self.batch_order(self.step),
            num_workers=workers,
            collate_fn=self.collate,
            prefetch_factor=2 if workers else None,
            worker_init_fn=die_with_parent() if workers else None,
            pin_memory=self.device.type == "cuda",
        )
        return iter(loader)

    def _next_batch(self):
        if self._batches is None:
            self._batches = self._loader()
        started = time.perf_counter()
        batch = next(self._batches)
        self.loader_wait += time.perf_counter() - started
        return batch

    def _check_finite(self, loss: torch.Tensor) -> None:
        """A NaN / inf loss stops the run; the last checkpoint, written before this step, stays the good one."""
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {loss.item()} at step {self.step + 1}; stopped. The last good checkpoint is kept in "
                f"{self.checkpoints / 'last'} (lower optim.lr or use train.precision=fp32)"
            )

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _save(self, name: str, val_dice: float = float("nan")) -> None:
        """Write checkpoints/<name>/ (``CheckpointStore``: temporary folder, checksums, renames; ``last`` keeps its
        predecessor as ``previous``). A failed write stops the run with the earlier checkpoints intact."""
        if not self.is_writer:
            return
        state = loop_state(self, best_dice=self.best_dice)

        def write(folder: Path) -> None:
            self._write_weights(folder, val_dice)
            torch.save(state, folder / STATE)

        write_checkpoint(CheckpointStore(self.checkpoints), name, self.step, write)
        self._saved_at = time.monotonic()

    def _best_is_last(self) -> None:
        """Without a validation score, ``best`` is the last checkpoint: a sealed copy of it."""
        last = self.checkpoints / "last"

        def copy(folder: Path) -> None:
            for path in last.iterdir():
                if path.name != SEAL:
                    shutil.copy2(path, folder / path.name)

        write_checkpoint(CheckpointStore(self.checkpoints), "best", self.step, copy)

    def resume(self) -> bool:
        """Continue from the newest intact checkpoint (``last``, else ``previous``, checked against their checksums);
        returns whether there was one. Prints where it resumed from."""
        found = checkpoint_to_resume(CheckpointStore(self.checkpoints))
        if found is None:
            return False
        folder, _ = found
        self._load_weights(folder)
        state = restore_loop_state(self, folder)
        self._batches = None  # the loader starts again at the resumed step
        self.best_dice = state.get("best_dice", -math.inf)
        if self.is_writer:
            print(f"resumed from {folder} at step {self.step}", flush=True)
            MetricsLog(self.layout, self.log_fields).rewrite(self.history)
        return True

    # -- the loop -------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_after: int | None = None):
        """Train to ``train.steps`` (or stop early after ``stop_after`` steps of this call, for tests).

        The run directory is locked for the whole call (``RunLock``: a second job on it is refused). SIGINT /
        SIGTERM end the run gracefully: a checkpoint first, then ``TrainingInterruptedError``.
        """
        lock = RunLock(self.run_dir) if self.is_writer else None
        if lock is not None:
            lock.acquire()
        try:
            with StopSignals() as stop:
                return self._fit(resume, stop_after, stop)
        finally:
            self._batches = None  # stops the loader's worker processes
            if lock is not None:
                lock.release()

    def _fit(self, resume: bool, stop_after: int | None, stop: StopSignals):
        cfg = self.config.train
        if resume:
            self.resume()
        if self.is_writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.config.save(self.layout.config)
            self._record_run()
        log = MetricsLog(self.layout, self.log_fields, tensorboard=self.is_writer)
        last_dice = float("nan")
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.is_writer, desc=self.name, unit="step")
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
            validate = self.validates and ((cfg.val_every and self.step % cfg.val_every == 0) or at_end)
            if validate:
                last_dice = row["val_dice"] = self.validate()
                if not math.isnan(last_dice) and last_dice > self.best_dice:
                    self.best_dice = last_dice
                    self._save("best", last_dice)
            periodic = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
            overdue = time.monotonic() - self._saved_at >= 60 * cfg.checkpoint_minutes
            if validate or at_end or periodic or overdue or stop.signal:
                self._save("last", last_dice)
            if self.is_writer:
                log.write(row, first=self.step == 1)
            bar.update(1)
            bar.set_postfix(self.progress(row))
            if stop.signal:
                bar.close()
                raise TrainingInterruptedError(
                    f"stopped by {stop.name} at step {self.step}; checkpoint saved in {self.checkpoints / 'last'} "
                    "(continue with --resume)"
                )
        bar.close()
        if self.is_writer and self.best_dice == -math.inf and (self.checkpoints / "last").exists():
            self._best_is_last()
        if self.is_writer and self.step == cfg.steps:
            log.plot(self.history)
        return self._result(last_dice)
