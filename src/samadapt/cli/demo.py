"""``samadapt demo``: adapt LiteMedSAM to real scans from a few slices and report before / after."""

from __future__ import annotations

import argparse

from samadapt.cli.options import DEVICE_HELP


def print_table(summary: dict) -> None:
    rows = summary["rows"]
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))
    print(f"wall time {summary['wall_seconds'] / 60:.1f} min; report: {summary['report']}")


def run(args: argparse.Namespace) -> int:
    from samadapt.demo import run_demo

    summary = run_demo(args.out, quick=args.quick, cache=args.cache, seed=args.seed, device=args.device)
    print_table(summary)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="adapt LiteMedSAM to real scans from a few slices; before/after report")
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("--quick", action="store_true", help="a smoke version (about 2 minutes)")
    parser.add_argument("--cache", help="demo data cache (default $SAMADAPT_CACHE or ~/.cache/samadapt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help=DEVICE_HELP)
    parser.set_defaults(func=run)
