"""The configuration of a pre-training run (``samadapt pretrain``), serialised as YAML in the run directory.

It reuses the training config's sections where they mean the same thing (model, PEFT, optimiser) and the same
``--set section.key=value`` machinery (``samadapt.train.config``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from samadapt.errors import ConfigError
from samadapt.files import atomic_write_text
from samadapt.peft.config import PeftConfig
from samadapt.precision import PRECISIONS
from samadapt.train.config import ModelConfig, OptimConfig, merge

METHODS = ("mae", "emix", "shed", "mix")


@dataclass
class PretrainDataConfig:
    """path: dataset directory (any layout ``load_dataset`` reads; labels are ignored); axis: slicing axis (None:
    the dataset's); test_images: also use the unlabelled test images (imagesTs / test); workers: DataLoader
    processes reading slices."""

    path: str = ""
    axis: int | None = None
    test_images: bool = True
    workers: int = 2


@dataclass
class ObjectiveConfig:
    """The self-supervised objectives (docs/pretraining.md).

    Attributes:
        patch: side, in model-input pixels, of the square units that are masked or shuffled (a multiple of the
            patch embedding's stride and of the encoder's output stride: 16 fits ViT, LiteMedSAM and MobileSAM).
        mask_ratio: MAE, fraction of the image's units whose patch embeddings are replaced by the mask embedding.
        shuffle_ratio: ShED, fraction of the image's units whose embeddings are permuted among themselves.
        mix_alpha: e-Mix, the mixing coefficient is drawn from Beta(alpha, alpha).
        temperature: e-Mix, softmax temperature of the contrastive logits.
        mae / emix / shed: weights of each objective in ``mix`` (a single method uses its own objective alone).
    """

    patch: int = 16
    mask_ratio: float = 0.6
    shuffle_ratio: float = 0.25
    mix_alpha: float = 1.0
    temperature: float = 0.1
    mae: float = 1.0
    emix: float = 1.0
    shed: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.mask_ratio < 1 or not 0 < self.shuffle_ratio < 1:
            raise ConfigError("objective.mask_ratio and objective.shuffle_ratio must lie in (0, 1)")
        if self.patch < 1 or self.mix_alpha <= 0 or self.temperature <= 0:
            raise ConfigError("objective.patch, objective.mix_alpha and objective.temperature must be > 0")


@dataclass
class PretrainLoopConfig:
    """steps: optimiser steps; batch_size: slices per step (e-Mix contrasts them with each other, so >= 2);
    precision / device / checkpoint_every / checkpoint_minutes / max_grad_norm / grad_checkpointing: as in
    ``samadapt train`` (``TrainLoopConfig``)."""

    steps: int = 200
    batch_size: int = 4
    precision: str = "auto"
    grad_checkpointing: bool = False
    seed: int = 0
    max_grad_norm: float | None = 1.0
    device: str = "auto"
    checkpoint_every: int = 50
    checkpoint_minutes: float = 10.0


@dataclass
class PretrainConfig:
    """method: ``mae``, ``emix``, ``shed`` or ``mix`` (their weighted sum); recipe: the fine-tuning recipe whose
    encoder PEFT slots are pre-trained (its ``peft`` section is the default of ``peft``)."""

    method: str = "mix"
    recipe: str = "cheap-lunch"
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: PretrainLoopConfig = field(default_factory=PretrainLoopConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"pretrain method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.train.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.train.precision!r}")
        if self.train.steps < 1:
            raise ConfigError("train.steps must be >= 1")
        if self.train.batch_size < 2 and self.method in ("emix", "mix"):
            raise ConfigError("e-Mix contrasts the slices of a batch with each other: train.batch_size must be >= 2")
        if self.model.init:
            raise ConfigError("model.init starts a fine-tuning run; a pre-training run starts from the base model")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["peft"] = self.peft.to_dict()
        return data

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump({"kind": "pretrain", **self.to_dict()}, sort_keys=False))


def pretrain_defaults(recipe: str = "cheap-lunch") -> dict:
    """The config dict of a pre-training run for ``recipe``'s PEFT slots (``PretrainConfig`` defaults otherwise)."""
    from samadapt.train.recipes import RECIPES

    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    data = PretrainConfig().to_dict()
    data["recipe"] = recipe
    merge(data["peft"], copy.deepcopy(RECIPES[recipe].get("peft", {})), "peft.")
    return data
