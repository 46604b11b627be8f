"""``samadapt pretrain``: every flag maps onto a ``PretrainConfig`` field; ``--set`` reaches any other."""

from __future__ import annotations

import argparse
import sys

from samadapt.cli.options import DEVICE_HELP


def build_config(args: argparse.Namespace):
    """The recipe's PEFT slots and the defaults, then the YAML file, the flags, ``--set`` (``layered_config``)."""
    from samadapt.pretrain.config import PretrainConfig, pretrain_defaults
    from samadapt.train.config import layered_config

    flags = {
        "method": args.method,
        "data.path": args.data,
        "peft.method": args.peft,
        "model.name": args.model,
        "model.checkpoint": args.checkpoint,
        "train.steps": args.steps,
        "train.device": args.device,
    }
    return layered_config(PretrainConfig, pretrain_defaults(args.recipe), args.config, flags, args.set)


def run(args: argparse.Namespace) -> int:
    from samadapt.errors import TrainingInterruptedError
    from samadapt.pretrain.api import pretrain

    config = build_config(args)
    try:
        result = pretrain(config, args.out, resume=args.resume)
    except TrainingInterruptedError as stopped:
        print(f"samadapt pretrain: {stopped}", file=sys.stderr)
        return 130
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    print(
        f"pre-trained ({config.method}) {result.steps} steps; loss {first:.4f} -> {last:.4f}; run directory "
        f"{args.out} (start a fine-tuning run from it with samadapt train --init {args.out})"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from samadapt.peft.registry import METHODS as PEFT_METHODS
    from samadapt.pretrain.config import METHODS
    from samadapt.train.recipes import RECIPES

    parser = subparsers.add_parser(
        "pretrain", help="self-supervised pre-training of the encoder's PEFT parameters on unlabelled slices"
    )
    parser.add_argument("--method", choices=METHODS, help="objective: mae, emix, shed, or mix (weighted sum; default)")
    parser.add_argument("--data", required=True, help="dataset directory (any layout; labels ignored, imagesTs used)")
    parser.add_argument("--out", required=True, help="run directory (config, checkpoints, metrics)")
    parser.add_argument(
        "--recipe", default="cheap-lunch", choices=sorted(RECIPES), help="fine-tuning recipe whose encoder slots train"
    )
    parser.add_argument("--peft", choices=PEFT_METHODS, help="PEFT method instead of the recipe's (msa, lora, ...)")
    parser.add_argument("--model", help="base model (default: lite_medsam, the embedded LiteMedSAM)")
    parser.add_argument("--checkpoint", help="weights file of the base model")
    parser.add_argument("--steps", type=int, help="optimiser steps")
    parser.add_argument("--device", help=DEVICE_HELP)
    parser.add_argument("--config", help="YAML file with config values")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="any config value, e.g. objective.mask_ratio=0.5"
    )
    parser.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/last")
    parser.set_defaults(func=run)
