"""The pre-training step around the self-supervised objectives, on the one training loop (``train.loop``: sealed
checkpoints, run lock, exact resume, signals, metrics log).

A checkpoint folder holds what a fine-tuning checkpoint holds (``adapter_model.safetensors``: the encoder PEFT
tensors only; ``adapter_config.json``; ``trainer_state.pt``) plus ``pretrain_heads.safetensors``, the objectives'
heads, kept apart so that nothing downstream mistakes them for fine-tuning parameters.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from samadapt.errors import TrainingError
from samadapt.peft import save_adapter
from samadapt.peft.inject import load_adapter_weights, train_mode
from samadapt.pretrain.config import PretrainConfig
from samadapt.pretrain.data import ModelInputs, collate
from samadapt.pretrain.objectives import Objectives, PretrainHeads, objectives_of
from samadapt.train.loop import TrainingLoop
from samadapt.train.step import optimizer_step

HEADS = "pretrain_heads.safetensors"


@dataclass
class PretrainResult:
    steps: int
    run_dir: Path
    history: list[dict]


class Pretrainer(TrainingLoop):
    """Trains the encoder PEFT parameters of ``model`` (and ``heads``) on ``inputs`` with ``config.method``.

    Args:
        model: a ``Sam`` with the encoder-only PEFT config applied (``peft.pretrained.encoder_only``).
        heads: the objectives' heads.
        inputs: unlabelled slices on the model-input grid.
        manifest: base-model facts and the PEFT config for the checkpoints' manifest.
    """

    log_fields = ("step", "loss", "mae", "emix", "shed", "lr", "seconds_per_step", "loader_seconds")
    name = "pretrain"
    collate = staticmethod(collate)

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
        super().__init__(config, model, run_dir)
        self.heads = heads.to(self.device)
        self.inputs = self.batch_data = inputs
        self.manifest = manifest
        encoder = [p for p in self.model.parameters() if p.requires_grad]
        if not encoder:
            raise TrainingError("the PEFT configuration puts no trainable parameter into the image encoder")
        self._set_up_optimisation(encoder + list(self.heads.parameters()))
        self.rng = np.random.default_rng(config.train.seed)
        self.objectives = Objectives(self.model, self.heads, config.objective, self.rng)
        torch.manual_seed(config.train.seed)

    # -- batches --------------------------------------------------------------------------------------------
    def picks_for(self, step: int) -> list[int]:
        """The slices of step ``step``: a function of (seed, step) alone, so a resumed run draws what an
        uninterrupted one would and loader workers can read ahead."""
        rng = np.random.default_rng([self.config.train.seed, step, 2])
        count = self.config.train.batch_size
        return [int(i) for i in rng.choice(len(self.inputs), size=count, replace=len(self.inputs) < count)]

    def batch_order(self, start: int) -> Iterator[list[int]]:
        return (self.picks_for(step) for step in itertools.count(start))

    # -- one step -------------------------------------------------------------------------------------------
    def batch_losses(self, images: torch.Tensor, resized: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every objective's loss on one batch, and ``loss``, their (weighted) sum."""
        with self._autocast():
            return self.objectives.losses(self.config.method, images.to(self.device), resized)

    def train_step(self) -> dict:
        train_mode(self.model)
        self.heads.train()
        self.optimizer.zero_grad(set_to_none=True)
        images, resized = self._next_batch()
        losses = self.batch_losses(images, resized)
        loss = losses["loss"]
        self._check_finite(loss)
        self.scaler.scale(loss).backward()
        lr = optimizer_step(self, self.params, self.config.train.max_grad_norm)
        return {"step": self.step, "lr": lr, **{k: float(v.detach()) for k, v in losses.items()}}

    def progress(self, row: dict) -> dict[str, str]:
        return {k: f"{row[k]:.4f}" for k in ("loss", *objectives_of(self.config.method))}

    # -- checkpoints and result -----------------------------------------------------------------------------
    def _write_weights(self, folder: Path, val_dice: float) -> None:
        save_adapter(self.model, folder, {**self.manifest, "step": self.step})
        heads = {k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()}
        save_file(heads, str(folder / HEADS))

    def _load_weights(self, folder: Path) -> None:
        load_adapter_weights(self.model, folder, self.manifest["base_sha256"])
        self.heads.load_state_dict(load_file(str(folder / HEADS), device=str(self.device)))

    def _result(self, last_dice: float) -> PretrainResult:
        return PretrainResult(self.step, self.run_dir, self.history)
