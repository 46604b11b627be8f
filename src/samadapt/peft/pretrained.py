"""Pre-trained encoder PEFT parameters: what pre-training trains (``encoder_only``, ``encoder_peft_names``) and
moving them into a fine-tuning model (``samadapt train --init RUN``).

A pre-training run saves only the encoder's PEFT tensors, under the manifest's ``peft`` (``encoder_only``): the same
adapter / LoRA slots as the fine-tuning recipe, without its decoder parts. ``load_encoder_peft`` copies them from a
checkpoint folder into a model built for fine-tuning, after checking that the base model is the same (SHA-256 of the
weights) and that the slots match one for one; ``runs.load_pretrained_encoder`` finds that folder in a run directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from samadapt.errors import RunError
from samadapt.peft.config import PeftConfig
from samadapt.peft.inject import ADAPTER_WEIGHTS, is_peft_key, read_manifest


class PretrainedInitError(RunError):
    """A pre-trained run that cannot start this fine-tuning run (other base model, other slots, not a run)."""


def encoder_only(peft: PeftConfig) -> PeftConfig:
    """``peft`` restricted to the image encoder: no decoder adapters / LoRA, no fully trained modules, no depth
    branch (pre-training sees single slices)."""
    return PeftConfig(
        method=peft.method,
        adapter=dataclasses.replace(peft.adapter, decoder=False),
        lora=dataclasses.replace(peft.lora, decoder=False),
        depth=False,
        train_modules=[],
    )


def encoder_peft_names(model: nn.Module) -> set[str]:
    """The model's encoder PEFT parameters that pre-training trains (the depth branch excepted)."""
    return {
        name
        for name, _ in model.named_parameters()
        if name.startswith("image_encoder.") and is_peft_key(name) and ".depth_branch." not in name
    }


def load_encoder_peft(model: nn.Module, folder: Path, base_sha256: str) -> dict:
    """Copy the encoder PEFT tensors of a pre-training checkpoint ``folder`` into ``model`` (already built with its
    fine-tuning PEFT config); returns the checkpoint's manifest.

    Raises:
        PretrainedInitError: the checkpoint is not a pre-training one, was trained on other base weights, or its
            tensors do not match the model's encoder PEFT slots one for one (name and shape).
    """
    manifest = read_manifest(folder)
    if manifest.get("task") != "pretrain":
        raise PretrainedInitError(
            f"{folder}: a {manifest.get('task', '?')} run, not a pre-training run (samadapt pretrain)"
        )
    if manifest["base_sha256"] != base_sha256:
        raise PretrainedInitError(
            f"{folder}: pre-trained on base weights {manifest['base_sha256'][:12]}... ({manifest['base_model']}); "
            f"this run's base model has {base_sha256[:12]}...: pre-train on the same base model"
        )
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    own = dict(model.named_parameters())
    wanted = encoder_peft_names(model)
    extra, missing = sorted(set(tensors) - wanted), sorted(wanted - set(tensors))
    if extra or missing:
        raise PretrainedInitError(
            f"{folder}: its encoder PEFT slots ({manifest['peft']['method']}) differ from this run's "
            f"({len(missing)} of this run's missing, e.g. {missing[:2]}; {len(extra)} without a place, e.g. "
            f"{extra[:2]}): pre-train with this recipe's PEFT method (samadapt pretrain --recipe / --peft)"
        )
    for key, value in tensors.items():
        if own[key].shape != value.shape:
            raise PretrainedInitError(
                f"{folder}: {key} is {tuple(value.shape)}, this run's is {tuple(own[key].shape)} (another rank or "
                "ratio): pre-train with the same PEFT hyper-parameters"
            )
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    return manifest
