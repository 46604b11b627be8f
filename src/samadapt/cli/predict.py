"""``samadapt predict``: segment a volume or image (or a folder of them); labels are written on the input's grid."""

from __future__ import annotations

import argparse
import json

import numpy as np

from samadapt.cli.options import add_predictor_options, largest_component_classes, predictor_from
from samadapt.errors import ConfigError, DataError


def predict_command(args: argparse.Namespace) -> int:
    from samadapt.data.dicom import write_source_record
    from samadapt.data.dicom_out import label_format, write_dicom_labels
    from samadapt.data.io import read_volume, write_label
    from samadapt.predict import VOLUME_CACHE, predict_folder, predict_volume
    from samadapt.runs import algorithm_of

    if (args.image is None) == (args.input is None):
        raise ConfigError("give one input: an IMAGE file, or a folder with -i/--input")
    if args.input is not None and (args.series or args.format):
        raise ConfigError("--series and --format are for one IMAGE (a DICOM folder), not a folder of cases (-i)")
    # the input and the output format are checked before the (slow) model load
    dicom_format = label_format(args.out, args.format) if args.input is None else None
    volume = read_volume(args.image, series=args.series) if args.input is None else None
    if dicom_format and volume.dicom is None:
        raise DataError(f"{args.out}: a {dicom_format} output references a DICOM series; {args.image} is not DICOM")
    # the run (or an ONNX export's) on its backend: the one place --backend is read
    predictor = predictor_from(args, cache_size=VOLUME_CACHE)
    run = predictor.run
    if args.input is not None:
        written = predict_folder(
            run,
            args.input,
            args.out,
            preprocessing=args.preprocessing,
            predictor=predictor,
            largest_component=largest_component_classes(args.largest_component),
        )
        print(f"wrote {len(written)} predictions into {args.out} (existing ones kept)")
        return 0
    points = np.asarray(json.loads(args.points), dtype=np.float32) if args.points else None
    boxes = np.asarray(json.loads(args.boxes), dtype=np.float32) if args.boxes else None
    labels = predict_volume(
        run,
        volume,
        points=points,
        boxes=boxes,
        text=args.text,
        preprocessing=args.preprocessing,
        predictor=predictor,
        largest_component=largest_component_classes(args.largest_component),
        memory=args.propagation == "memory",
    )
    if dicom_format:
        classes = {int(v): f"object {int(v)}" for v in np.unique(labels) if v > 0} | dict(run.classes or {})
        path = write_dicom_labels(volume, labels, args.out, classes, algorithm_of(run), dicom_format)
    else:
        path = write_label(volume, labels, args.out)
        if volume.dicom is not None:  # the labels keep a way back to the series they were predicted on
            print(f"wrote {write_source_record(volume, path)}")
    print(f"wrote {path} ({int((labels > 0).sum())} labelled voxels)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    predict = subparsers.add_parser("predict", help="segment a volume or image; writes labels on the input's grid")
    predict.add_argument("image", nargs="?", help="NIfTI / NRRD / MHA / DICOM folder / PNG")
    predict.add_argument("--series", help="DICOM: the SeriesInstanceUID to read from a folder holding several")
    predict.add_argument(
        "-i", "--input", help="a folder of images (semantic runs): every case predicted, finished ones skipped"
    )
    predict.add_argument("--run", required=True, help="run directory, or a model name")
    predict.add_argument("--points", help="JSON [[x, y, z, label], ...] in voxel coordinates (label 1 fg, 0 bg)")
    predict.add_argument(
        "--boxes",
        help="JSON [[x0, y0, x1, y1, z], ...] per slice, or [[x0, y0, z0, x1, y1, z1(, class)], ...] "
        "volume boxes, one object each, propagated from their middle slice",
    )
    predict.add_argument("--text", help="a phrase naming the target (runs trained with prompt.kind=text)")
    predict.add_argument("--preprocessing", help="intensity preset (default: the run's)")
    predict.add_argument(
        "-o",
        "--out",
        required=True,
        help="output label file (.nii.gz, .nrrd, .mha, .png; .dcm: a DICOM SEG, *rtstruct.dcm: an RT Structure "
        "Set, both for DICOM inputs), or folder with -i",
    )
    predict.add_argument(
        "--format",
        choices=["dicom-seg", "rtstruct"],
        help="write a DICOM Segmentation or an RT Structure Set referencing the input series (default: from --out)",
    )
    add_predictor_options(predict)
    predict.set_defaults(func=predict_command)
