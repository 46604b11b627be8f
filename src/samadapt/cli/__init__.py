"""The ``samadapt`` command: one small module per sub-command, each a thin layer over the library API.

Errors: a ``SamadaptError`` (a bad file, dataset, configuration or run directory: something the user can fix) is
printed in one line with exit status 2; anything else is a bug or a resource failure and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from samadapt import __version__
from samadapt.errors import SamadaptError

# Transparent huge pages for torch's large CPU tensors: a fresh activation then costs one page fault per 2 MB instead
# of one per 4 kB (LiteMedSAM's encoder on one thread: fp32 1.2-1.3x, bf16 1.1x, the same numbers, peak RSS +0-10 %;
# docs/performance.md). torch reads it at its first allocation, so it is set before any command runs;
# THP_MEM_ALLOC_ENABLE=0 in the environment keeps it off. The command owns its process; the library sets nothing.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

COMMANDS = ["info", "data", "synth", "train", "pretrain", "evaluate", "predict", "complete", "demo", "export", "serve"]


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
