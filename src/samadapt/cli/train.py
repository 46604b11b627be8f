"""``samadapt train``: every flag maps onto a ``TrainConfig`` field; ``--set`` reaches any other."""

from __future__ import annotations

import argparse
import sys

from samadapt.cli.options import DEVICE_HELP


def build_config(args: argparse.Namespace):
    """Recipe defaults, then the YAML file, then the flags, then ``--set`` (``train.config.layered_config``)."""
    from samadapt.train.config import TrainConfig, layered_config
    from samadapt.train.recipes import recipe_defaults

    flags = {
        "data.path": args.data,
        "model.name": args.model,
        "model.checkpoint": args.checkpoint,
        "data.exemplars": args.exemplars,
        "train.steps": args.steps,
        "prompt.objects": args.objects,
        "train.device": args.device,
        "model.init": args.init,
    }
    return layered_config(TrainConfig, recipe_defaults(args.recipe), args.config, flags, args.set)


def run(args: argparse.Namespace) -> int:
    from samadapt.errors import TrainingInterruptedError
    from samadapt.train.api import train

    config = build_config(args)
    try:
        result = train(config, args.out, resume=args.resume)
    except TrainingInterruptedError as stopped:
        print(f"samadapt train: {stopped}", file=sys.stderr)
        return 130  # as a shell reports a job ended by a signal
    print(f"trained {result.steps} steps; best validation Dice {result.best_val_dice:.4f}; run directory {args.out}")
    for warning in result.warnings:
        print(f"samadapt train: WARNING: {warning}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from samadapt.train.recipes import RECIPES

    parser = subparsers.add_parser("train", help="adapt a model to a dataset with one of the papers' recipes")
    parser.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    parser.add_argument("--data", required=True, help="dataset directory (MSD / nnU-Net layout, or images/ + masks/)")
    parser.add_argument("--out", required=True, help="run directory (config, checkpoints, logs)")
    parser.add_argument("--model", help="base model (default: lite_medsam, the embedded LiteMedSAM)")
    parser.add_argument("--checkpoint", help="weights file of the base model")
    parser.add_argument("--exemplars", type=int, help="train on this many labelled slices only (Cheap Lunch selection)")
    parser.add_argument("--steps", type=int, help="optimiser steps")
    parser.add_argument("--objects", choices=["class", "instance"], help="one prompt per class, or per component")
    parser.add_argument("--device", help=DEVICE_HELP)
    parser.add_argument("--config", help="YAML file with config values (e.g. configs/samed-paper.yaml)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config value, e.g. optim.lr=1e-3")
    parser.add_argument("--init", metavar="RUN", help="start from a pre-training run's encoder PEFT parameters")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last")
    parser.set_defaults(func=run)
