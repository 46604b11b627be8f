"""The papers' recipes as configuration presets.

Each recipe carries its paper's method and loss; its schedule is the laptop default (a few hundred steps on
LiteMedSAM at 256, a few minutes on 2 CPU cores). The papers' full-data schedules are in ``configs/*-paper.yaml``.

- msa: adapters (encoder + first decoder block); clicks with iterative corrective clicks, and boxes; BCE + Dice;
  used at half the trained update (``peft.blend`` 0.5, weight-space ensembling with the base model).
- msa-3d: the same plus the depth branch, trained on stacks of adjacent slices.
- samed: LoRA on q/v, prompt encoder and decoder trained; semantic (K + 1 masks, no prompt); 0.2 CE + 0.8 Dice
  (Dice over the foreground classes present, class-balanced CE: ``SegmentationLoss``); AdamW 1e-3 with linear warm-up
  then poly decay.
- cheap-lunch: LoRA in encoder and decoder (and the small IoU head, for meaningful scores); one random point per
  object; 1.0 CE + 0.8 Dice; AdamW 1e-3 with warm-up then exponential decay.
Learning rates are the laptop defaults for a few hundred steps; the papers' values are in configs/.
"""

from __future__ import annotations

import copy

from samadapt.errors import ConfigError

RECIPES: dict[str, dict] = {
    "msa": {
        "task": "prompt",
        # blend 0.5 (WiSE-FT): from 3 slices the full update overshoots; half of it scored better with clicks AND
        # boxes on the protocol (box 0.654 -> 0.756, point:1 0.549 -> 0.619; issue 18, docs/accuracy.md)
        "peft": {"method": "msa", "blend": 0.5},
        "prompt": {"kind": "mixed", "points": 1, "iterative_rounds": 2},
        "loss": {"ce": 1.0, "dice": 1.0},
        "optim": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 10},
    },
    "msa-3d": {
        "task": "prompt",
        "peft": {"method": "msa", "depth": True},
        "prompt": {"kind": "point", "points": 1, "iterative_rounds": 1},
        "loss": {"ce": 1.0, "dice": 1.0},
        "optim": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 10},
        "train": {"depth_slices": 4, "batch_size": 1},
    },
    "samed": {
        "task": "semantic",
        "peft": {"method": "lora", "lora": {"rank": 4, "encoder_parts": ["q", "v"]}},
        "loss": {"ce": 0.2, "dice": 0.8},
        # 1e-3, not the paper's 5e-3: the prompt encoder and the whole decoder train too, and at 5e-3 a few-slice
        # run's first steps wreck the pre-trained decoder onto the all-background plateau (issue 18, docs/accuracy.md)
        "optim": {"lr": 1e-3, "schedule": "poly", "poly_power": 0.9, "warmup_steps": 20},
    },
    "cheap-lunch": {
        "task": "prompt",
        # the IoU head trains too (MSE on the true IoU), so that predicted scores stay meaningful
        "peft": {
            "method": "lora",
            "lora": {"rank": 4, "decoder": True},
            "train_modules": ["mask_decoder.iou_prediction_head"],
        },
        # point-only: prompt mixing (kind=mixed, box_share 0.25) with one-click multimask training measured worse on
        # the protocol (issue 18, docs/accuracy.md); one click is answered by the best candidate at inference only
        "prompt": {"kind": "point", "points": 1, "iterative_rounds": 0},
        "loss": {"ce": 1.0, "dice": 0.8},
        "optim": {"lr": 1e-3, "schedule": "exponential", "warmup_steps": 10, "final_lr_ratio": 0.05},
    },
}


def recipe_defaults(name: str) -> dict:
    """The full configuration dict of a recipe: ``TrainConfig`` defaults updated by the recipe's values."""
    from samadapt.train.config import TrainConfig, merge

    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    data = TrainConfig().to_dict()
    data["recipe"] = name
    return merge(data, copy.deepcopy(RECIPES[name]))
