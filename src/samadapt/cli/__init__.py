"""The ``samadapt`` command: one small module per sub-command, each a thin layer over the library API.

Errors: a ``SamadaptError`` (a bad file, dataset, configuration or run directory: something the user can fix) is
printed in one line with exit status 2; anything else is a bug or a resource failure and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from samadapt import __version__
from samadapt.errors import SamadaptError

COMMANDS = ["info", "data", "synth", "train", "evaluate", "predict", "demo", "export", "serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samadapt", description="Adapt SAM to medical images from few labels.")
    parser.add_argument("--version", action="version", version=f"samadapt {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"samadapt.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SamadaptError as error:
        print(f"samadapt {args.command}: error: {error}", file=sys.stderr)
        return 2
