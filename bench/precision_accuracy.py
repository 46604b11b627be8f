"""How far reduced-precision inference's masks are from fp32's, on the real demo data (issue 14).

For every labelled slice of the demo lesions (class 1) and every ``--mni-step``-th slice of the MNI152 template (grey
and white matter), the real LiteMedSAM is prompted with the label's bounding box (``prompts.box_from_mask``) twice:
in fp32 and at ``--precision`` (default auto: bf16 where the device has native bf16 kernels). Prints per dataset the
mean Dice of the reduced mask against the fp32 mask, the lowest one, and each precision's mean Dice against the
ground truth, as a markdown table.

    .venv/bin/python bench/precision_accuracy.py [--precision auto] [--mni-step 8]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--mni-step", type=int, default=8, help="every n-th MNI152 slice that holds the class")
    args = parser.parse_args(argv)

    from samadapt.data import SliceDataset, load_dataset
    from samadapt.data.demo import fetch_demo
    from samadapt.device import resolve_device
    from samadapt.eval.metrics import dice
    from samadapt.models import build_model
    from samadapt.precision import resolve_precision
    from samadapt.predict import Predictor
    from samadapt.prompts import box_from_mask

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    model = build_model("lite_medsam")
    fp32 = Predictor(model, device=device, precision="fp32")
    reduced = Predictor(model, device=device, precision=precision)
    demo = fetch_demo()
    print(f"device {device}, precision {args.precision} -> {precision}")
    print("| data | class | slices | Dice reduced vs fp32: mean (min) | GT Dice fp32 | GT Dice reduced | change |")
    print("|---|---|---|---|---|---|---|")
    totals: list[tuple[float, float, float]] = []
    for name, classes, step in (("lesions", (1,), 1), ("mni152", (1, 2), args.mni_step)):
        slices = SliceDataset(load_dataset(demo[name]))
        for value in classes:
            rows = []
            indices = slices.indices([value])
            for i in indices[::step]:
                item = slices[i]
                gt = item["label"] == value
                box = box_from_mask(gt)
                masks = []
                for predictor in (fp32, reduced):
                    predictor.set_image(item["image"], preprocessed=True)
                    masks.append(predictor.predict(boxes=box).masks[0, 0])
                agreement = dice(masks[1], masks[0])  # NaN: both empty, which is agreement
                rows.append((1.0 if np.isnan(agreement) else agreement, dice(masks[0], gt), dice(masks[1], gt)))
            agree, gt32, gt_reduced = (np.array(column) for column in zip(*rows, strict=True))
            totals.extend(rows)
            print(
                f"| {name} | {value} | {len(rows)} | {agree.mean():.4f} ({agree.min():.4f}) | {gt32.mean():.4f} | "
                f"{gt_reduced.mean():.4f} | {gt_reduced.mean() - gt32.mean():+.4f} |"
            )
    agree, gt32, gt_reduced = (np.array(column) for column in zip(*totals, strict=True))
    print(
        f"| all | | {len(totals)} | {agree.mean():.4f} ({agree.min():.4f}) | {gt32.mean():.4f} | "
        f"{gt_reduced.mean():.4f} | {gt_reduced.mean() - gt32.mean():+.4f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
