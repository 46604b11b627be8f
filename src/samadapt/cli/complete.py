"""``samadapt complete``: a few labelled slices of one volume -> labels for every slice (the given ones kept)."""

from __future__ import annotations

import argparse

from samadapt.cli.options import DEVICE_HELP


def complete_command(args: argparse.Namespace) -> int:
    from samadapt.complete import complete_volume
    from samadapt.data.io import read_label, read_volume, write_label
    from samadapt.errors import ConfigError
    from samadapt.runs import load_run

    if (args.run is None) == (args.out_run is None):
        raise ConfigError("give --run RUN (a trained semantic run) or --out-run DIR (where to adapt one), not both")
    image, labels = read_volume(args.image), read_label(args.labels)
    run = load_run(args.run, device=args.device) if args.run else None
    try:
        slices = [int(s) for s in args.slices.split(",") if s.strip()] if args.slices else None
    except ValueError:
        raise ConfigError(f"--slices {args.slices!r}: give slice numbers such as 10,40,70") from None
    preset = args.preprocessing or (run.preprocessing if run is not None and run.preprocessing else "mr")
    training = {k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v is not None}
    completed = complete_volume(
        image,
        labels,
        run_dir=args.out_run,
        run=run,
        recipe=args.recipe,
        seed=args.seed,
        axis=args.axis if args.axis is not None else (run.axis or 0 if run is not None else 0),
        slices=slices,
        preprocessing=preset,
        device=args.device,
        overrides=args.set,
        **training,
    )
    path = write_label(image, completed, args.out)
    print(f"wrote {path} (the labelled slices kept as given)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "complete", help="label every slice of a volume from a few labelled ones (a model adapted on them)"
    )
    parser.add_argument("labels", help="label file on the image's grid: the slices you labelled (others empty)")
    parser.add_argument("image", help="the volume (NIfTI / NRRD / MHA / DICOM folder)")
    parser.add_argument("--out", required=True, help="where to write the completed labels")
    parser.add_argument("--out-run", help="run directory to adapt a model into from the labelled slices")
    parser.add_argument("--run", help="a trained semantic run to complete with instead (nothing trains)")
    parser.add_argument("--recipe", default="samed", help="a semantic recipe (default samed)")
    parser.add_argument("--steps", type=int, help="training steps (default: samadapt.complete.DEFAULT_STEPS, 120)")
    parser.add_argument("--lr", type=float, help="learning rate (default: samadapt.complete.DEFAULT_LR, 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--axis", type=int, help="slicing axis (default 0, or the run's)")
    parser.add_argument("--slices", help="the labelled slices, e.g. 10,40,70 (default: those holding a label)")
    parser.add_argument("--preprocessing", help="intensity preset (default: the run's, else mr)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any training setting")
    parser.add_argument("--device", help=DEVICE_HELP)
    parser.set_defaults(func=complete_command)
