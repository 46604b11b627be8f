"""``pretrain``: the library entry point behind ``samadapt pretrain``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from samadapt.peft import apply_peft, format_parameter_report
from samadapt.peft.pretrained import encoder_only
from samadapt.pretrain.config import PretrainConfig
from samadapt.pretrain.data import ModelInputs, unlabelled_slices
from samadapt.pretrain.objectives import PretrainHeads, mae_target_width, objectives_of
from samadapt.pretrain.trainer import Pretrainer, PretrainResult
from samadapt.runs import base_model_facts, build_base


def build_pretrainer(config: PretrainConfig, run_dir: str | Path, verbose: bool = True) -> Pretrainer:
    """The model (base + the encoder part of ``config.peft``), the heads and the slices of ``config.data.path``."""
    slices = unlabelled_slices(config.data.path, config.data.axis, config.data.test_images)
    model = build_base(config.model.name, config.model.checkpoint, config.model.img_size, None)
    peft = encoder_only(config.peft)
    apply_peft(model, peft)
    if verbose:
        print(format_parameter_report(model))
    encoder = model.image_encoder
    heads = PretrainHeads(
        objectives_of(config.method),
        features=encoder.neck[0].out_channels,
        target_width=mae_target_width(encoder, config.objective.patch),
    )
    config.data.path = str(slices.spec.root)
    manifest = {
        **base_model_facts(config.model.name, config.model.checkpoint),
        "peft": peft.to_dict(),
        "recipe": config.recipe,
        "task": "pretrain",
        "img_size": model.img_size,
        "classes": {},
        "preprocessing": slices.spec.preprocessing,
        "axis": slices.axis,
        "precision": config.train.precision,
        "pretrain": {
            "method": config.method,
            "objective": dataclasses.asdict(config.objective),
            "data": config.data.path,
            "slices": len(slices),
            "cases": len(slices.cases),
        },
    }
    return Pretrainer(config, model, heads, ModelInputs(slices, model.img_size), run_dir, manifest)


def pretrain(config: PretrainConfig, run_dir: str | Path, resume: bool = False, verbose: bool = True) -> PretrainResult:
    """Pre-train the encoder PEFT parameters of ``config.peft`` on every slice of ``config.data.path`` (labels
    ignored); the run directory then starts fine-tuning runs (``TrainConfig.model.init``, ``samadapt train --init``)."""
    return build_pretrainer(config, run_dir, verbose).fit(resume=resume)
