"""The ``samadapt`` command: thin sub-commands over the library.

Each area of the library contributes its sub-commands through a ``register(subparsers)`` function in its own
``cli`` module, listed in ``_COMMAND_MODULES``; this file only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from samadapt import __version__
from samadapt.errors import SamadaptError

_COMMAND_MODULES = [
    "samadapt.info",
    "samadapt.data.cli",
    "samadapt.train.cli",
    "samadapt.pretrain.cli",
    "samadapt.synth_cli",
    "samadapt.eval.cli",
    "samadapt.demo",
    "samadapt.export.cli",
    "samadapt.serve.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samadapt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"samadapt {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (SamadaptError, FileNotFoundError, KeyError, ValueError) as error:
        # user errors: one clear line; anything else (a bug, out of memory) keeps its traceback
        print(f"samadapt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
