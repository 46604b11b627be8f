"""``samadapt info``: what this installation can do and where its model weights come from."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from samadapt.info import describe

    facts = describe()
    for key, value in facts.items():
        if key != "models":
            print(f"{key:14s} {value}")
    print("models:")
    for name, model in facts["models"].items():
        print(f"  {name:13s} input {model['input_size']:4d}  {model['about']}")
        print(f"  {'':13s} weights: {model['weights']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="version, device, available models and their weights")
    parser.set_defaults(func=run)
