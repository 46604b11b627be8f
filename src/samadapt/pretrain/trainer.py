"""The pre-training loop: the fine-tuning trainer's machinery (sealed checkpoints, run lock, exact resume, signals,
metrics CSV) around the self-supervised objectives.

A checkpoint folder holds what a fine-tuning checkpoint holds (``adapter_model.safetensors``: the encoder PEFT
tensors only; ``adapter_config.json``; ``trainer_state.pt``) plus ``pretrain_heads.safetensors``, the objectives'
heads, kept apart so that nothing downstream mistakes them for fine-tuning parameters.
"""

from __future__ import annotations

import csv
import itertools
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from samadapt.device import autocast, resolve_device
from samadapt.errors import TrainingError, TrainingInterruptedError
from samadapt.peft import save_adapter
from samadapt.peft.inject import load_adapter_weights, train_mode
from samadapt.precision import resolve_precision
from samadapt.pretrain.config import PretrainConfig
from samadapt.pretrain.data import ModelInputs, collate
from samadapt.pretrain.objectives import Objectives, PretrainHeads, objectives_of
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
from samadapt.train.schedule import build_scheduler
from samadapt.train.step import optimizer_step
from samadapt.train.trainer import _StopSignals
from samadapt.train.workers import die_with_parent

HEADS = "pretrain_heads.safetensors"
LOG_FIELDS = ("step", "loss", "mae", "emix", "shed", "lr", "seconds_per_step", "loader_seconds")


@dataclass
class PretrainResult:
    steps: int
    run_dir: Path
    history: list[dict]


class Pretrainer:
    """Trains the encoder PEFT parameters of ``model`` (and ``heads``) on ``inputs`` with ``config.method``.

    Args:
        model: a ``Sam`` with the encoder-only PEFT config applied (``init.encoder_only``).
        heads: the objectives' heads.
        inputs: unlabelled slices on the model-input grid.
        manifest: base-model facts and the PEFT config for the checkpoints' manifest.
    """

    def __init__(
        self,
        config: PretrainConfig,
        model: nn.Module,
        heads: PretrainHeads,
        inputs: ModelInputs,
        run_dir: str | Path,
        manifest: dict,
    ) -> None:
        if not len(inputs):
            raise TrainingError("no slices to pre-train on")
        self.config = config
        self.device = resolve_device(config.train.device)
        self.model = model.to(self.device)
        self.heads = heads.to(self.device)
        self.inputs = inputs
        self.run_dir = Path(run_dir)
        self.layout = RunLayout(self.run_dir)
        self.checkpoints = self.layout.checkpoints
        self.manifest = manifest
        encoder = [p for p in self.model.parameters() if p.requires_grad]
        if not encoder:
            raise TrainingError("the PEFT configuration puts no trainable parameter into the image encoder")
        self.params = encoder + list(self.heads.parameters())
        cfg = config.optim
        if cfg.name == "sgd":
            self.optimizer = torch.optim.SGD(
                self.params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = build_scheduler(
            self.optimizer,
            config.train.steps,
            cfg.schedule,
            warmup_steps=cfg.warmup_steps,
            power=cfg.poly_power,
            final_ratio=cfg.final_lr_ratio,
        )
        self.precision = resolve_precision(config.train.precision, self.device)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise TrainingError("fp16 training needs a CUDA device; use bf16 or fp32 on the CPU")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        if config.train.grad_checkpointing and hasattr(self.model.image_encoder, "set_grad_checkpointing"):
            self.model.image_encoder.set_grad_checkpointing(True)
        self.rng = np.random.default_rng(config.train.seed)
        self.objectives = Objectives(self.model, self.heads, config.objective, self.rng)
        torch.manual_seed(config.train.seed)
        self.step = 0
        self.history: list[dict] = []
        self.loader_wait = 0.0
        self._batches: Iterator | None = None

    # -- one step -------------------------------------------------------------------------------------------
    def picks_for(self, step: int) -> list[int]:
        """The slices of step ``step``: a function of (seed, step) alone, so a resumed run draws what an
        uninterrupted one would and loader workers can read ahead."""
        rng = np.random.default_rng([self.config.train.seed, step, 2])
        count = self.config.train.batch_size
        return [int(i) for i in rng.choice(len(self.inputs), size=count, replace=len(self.inputs) < count)]

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            workers = self.config.data.workers
            loader = DataLoader(
                self.inputs,
                batch_sampler=(self.picks_for(step) for step in itertools.count(self.step)),
                num_workers=workers,
                collate_fn=collate,
                prefetch_factor=2 if workers else None,
                worker_init_fn=die_with_parent() if workers else None,
                pin_memory=self.device.type == "cuda",
            )
            self._batches = iter(loader)
        started = time.perf_counter()
        batch = next(self._batches)
        self.loader_wait += time.perf_counter() - started
        return batch

    def batch_losses(self, images: torch.Tensor, resized: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every objective's loss on one batch, and ``loss``, their (weighted) sum."""
        with autocast(self.device, self.precision):
            return self.objectives.losses(self.config.method, images.to(self.device), resized)

    def train_step(self) -> dict:
        train_mode(self.model)
        self.heads.train()
        self.optimizer.zero_grad(set_to_none=True)
        images, resized = self._next_batch()
        losses = self.batch_losses(images, resized)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {loss.item()} at step {self.step + 1}; stopped. The last good checkpoint is kept in "
                f"{self.layout.checkpoint('last')} (lower optim.lr or use train.precision=fp32)"
            )
        self.scaler.scale(loss).backward()
        lr = optimizer_step(self, self.params, self.config.train.max_grad_norm)
        return {"step": self.step, "lr": lr, **{k: float(v.detach()) for k, v in losses.items()}}

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _save(self, name: str) -> None:
        manifest = {**self.manifest, "step": self.step}
        state = loop_state(self)
        heads = {k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()}

        def write(folder: Path) -> None:
            save_adapter(self.model, folder, manifest)
            save_file(heads, str(folder / HEADS))
            torch.save(state, folder / STATE)

        write_checkpoint(CheckpointStore(self.checkpoints), name, self.step, write)
        self._saved_at = time.monotonic()

    def resume(self) -> bool:
        """Continue from the newest intact checkpoint; returns whether there was one."""
        found = checkpoint_to_resume(CheckpointStore(self.checkpoints))
        if found is None:
            return False
        folder, _ = found
        load_adapter_weights(self.model, folder, self.manifest["base_sha256"])
        self.heads.load_state_dict(load_file(str(folder / HEADS), device=str(self.device)))
        restore_loop_state(self, folder)
        self._batches = None
        print(f"resumed from {folder} at step {self.step}", flush=True)
        self._write_log(self.history, rewrite=True)
        return True

    # -- the loop -------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_after: int | None = None) -> PretrainResult:
        """Pre-train to ``train.steps`` (or ``stop_after`` steps of this call), the run directory locked; SIGINT /
        SIGTERM write a checkpoint, then raise ``TrainingInterruptedError``."""
        lock = RunLock(self.run_dir)
        lock.acquire()
        try:
            with _StopSignals() as stop:
                return self._fit(resume, stop_after, stop)
        finally:
            self._batches = None
            lock.release()

    def _fit(self, resume: bool, stop_after: int | None, stop: _StopSignals) -> PretrainResult:
        cfg = self.config.train
        if resume:
            self.resume()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config.save(self.layout.config)
        started, done = time.perf_counter(), 0
        self._saved_at = time.monotonic()
        while self.step < cfg.steps and (stop_after is None or done < stop_after):
            waited = self.loader_wait
            row = self.train_step()
            done += 1
            row["loader_seconds"] = self.loader_wait - waited
            row["seconds_per_step"] = (time.perf_counter() - started) / done
            self.history.append(row)
            periodic = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
            overdue = time.monotonic() - self._saved_at >= 60 * cfg.checkpoint_minutes
            if periodic or overdue or stop.signal or self.step == cfg.steps:
                self._save("last")
            self._write_log([row])
            parts = " ".join(f"{k} {row[k]:.4f}" for k in objectives_of(self.config.method))
            print(f"pretrain step {self.step}/{cfg.steps}: loss {row['loss']:.4f} ({parts})", flush=True)
            if stop.signal:
                raise TrainingInterruptedError(
                    f"stopped by {stop.name} at step {self.step}; checkpoint saved in {self.layout.checkpoint('last')} "
                    "(continue with --resume)"
                )
        if self.step == cfg.steps and (self.layout.checkpoint("last")).exists():
            last = self.layout.checkpoint("last")

            def copy(folder: Path) -> None:  # no validation in pre-training: best is the final checkpoint
                for path in last.iterdir():
                    if path.name != SEAL:
                        shutil.copy2(path, folder / path.name)

            CheckpointStore(self.checkpoints).save("best", self.step, copy)
        return PretrainResult(self.step, self.run_dir, self.history)

    def _write_log(self, rows: list[dict], rewrite: bool = False) -> None:
        path = self.layout.metrics_csv
        new = rewrite or not path.exists() or self.step == 1
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with path.open("w" if new else "a", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=LOG_FIELDS, extrasaction="ignore")
            if new:
                out.writeheader()
            out.writerows(
                {k: v for k, v in row.items() if not isinstance(v, float) or math.isfinite(v)} for row in rows
            )
