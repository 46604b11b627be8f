"""``samadapt synth``: exemplar-guided synthesis of a training set (Cheap Lunch)."""

from __future__ import annotations

import argparse

from samadapt.errors import DataError


def synth_command(args: argparse.Namespace) -> int:
    from samadapt.data.datasets import SliceDataset, load_dataset
    from samadapt.data.synthesis import (
        SynthesisConfig,
        background_slices,
        inpaint_objects,
        select_exemplars,
        synthesize,
        write_synthetic_dataset,
    )

    spec = load_dataset(args.data)
    slices = SliceDataset(spec, axis=args.axis)
    classes = [int(c) for c in args.classes] if args.classes else sorted(spec.classes)
    unknown = sorted(set(classes) - set(spec.classes))
    if unknown:
        raise DataError(f"{spec.root}: classes {unknown} are not in the dataset ({spec.classes})")

    chosen = select_exemplars(slices, args.exemplars, classes, strategy=args.strategy, seed=args.seed)
    print(f"{len(chosen)} exemplars from {spec.root} (axis {slices.axis}, strategy {args.strategy}):")
    for k, i in enumerate(chosen):
        case_id, z, present = slices.slices[i]
        print(f"  {k:3d} case {case_id} slice {z} classes {[c for c in present if c in classes]}")
    exemplars = [slices[i] for i in chosen]

    found = background_slices(slices, classes, limit=args.max_backgrounds, seed=args.seed)
    if found:
        print(f"{len(found)} background slices (none of classes {classes})")
        backgrounds = [slices[i]["image"] for i in found]
    else:
        # e.g. a skull-stripped brain: every non-blank slice holds the targets; fall back to emptied exemplars
        print(f"no non-blank slice without classes {classes}: using the exemplars with their objects inpainted")
        backgrounds = [inpaint_objects(e["image"], e["label"], classes) for e in exemplars]

    items = synthesize(exemplars, backgrounds, args.size, SynthesisConfig(), seed=args.seed, classes=classes)
    names = {c: spec.classes[c] for c in classes}
    meta = write_synthetic_dataset(items, args.out, names, name=f"{spec.root.name}_synth", modality=spec.modality)
    print(f"wrote {len(items)} synthetic slices: {meta.parent}")
    print(f"  dataset.json {meta}")
    print(f"  preview      {meta.parent / 'preview.png'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="synthesise a training set from a few exemplar slices (Cheap Lunch)",
        description="Select exemplar slices, paste their transformed objects onto target-free background slices of "
        "the same dataset, and write the result as an MSD-style dataset with a preview.png.",
    )
    parser.add_argument("--data", required=True, help="dataset directory (MSD, nnU-Net v2 or 2D folders)")
    parser.add_argument("--exemplars", type=int, required=True, help="number of exemplar slices")
    parser.add_argument("--size", type=int, required=True, help="number of synthetic slices to write")
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--classes", type=int, nargs="+", help="target class ids (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategy", choices=("auto", "random", "most_classes"), default="auto")
    parser.add_argument("--axis", type=int, choices=(0, 1, 2), default=None, help="slicing axis (default: dataset's)")
    parser.add_argument(
        "--max-backgrounds", type=int, default=200, help="at most this many background slices (random, seeded)"
    )
    parser.set_defaults(func=synth_command)
