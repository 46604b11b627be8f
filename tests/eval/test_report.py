"""Report writer: metrics files (strict JSON), pictures (sizes, where things are drawn), Markdown and HTML pages."""

import csv
import json
import math
import re
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from samadapt.eval.figures import OverlayItem, save_loss_curve, save_overlay, save_overlay_grid
from samadapt.eval.metrics import EMPTY_MASK_CONVENTIONS, MetricAccumulator, aggregate, compute_case_metrics
from samadapt.eval.render import (
    ImageSection,
    TableSection,
    TextSection,
    comparison_section,
    markdown_table,
    write_report,
)
from samadapt.eval.report import save_evaluation
from samadapt.eval.results import write_metrics_files


def strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def rgb(path, x, y):
    return np.asarray(Image.open(path).convert("RGB"), dtype=int)[y, x]


@pytest.fixture
def slice_2d():
    """A 40 x 60 (H x W) ramp image, a GT square and a prediction shifted right."""
    image = np.tile(np.linspace(0, 1, 60), (40, 1)).astype(np.float32)
    gt = np.zeros((40, 60), bool)
    gt[10:30, 10:30] = True
    return image, gt, np.roll(gt, 5, axis=1)


def test_overlay_size_and_where_things_are_drawn(tmp_path, slice_2d):
    image, gt, pred = slice_2d
    empty = np.zeros_like(gt)
    path = save_overlay(image, empty, pred, tmp_path / "o.png", title="t", points=[[50, 8], [5, 35]],
                        point_labels=[1, 0], boxes=[8, 8, 32, 32], zoom=4)  # fmt: skip
    assert Image.open(path).size == (60 * 4, 40 * 4)  # (width, height)
    r, g, b = rgb(path, 20 * 4, 20 * 4)  # inside the prediction: pink fill over the grey ramp
    assert r > g + 40 and r > 100
    r, g, b = rgb(path, 50 * 4 + 2, 8 * 4 + 2)  # the positive click at (x, y) = (50, 8): green, not at (8, 50)
    assert g > r + 60 and g > b + 60
    r, g, b = rgb(path, 5 * 4 + 2, 35 * 4 + 2)  # the negative click: red
    assert r > g + 60 and r > b + 60
    r, g, b = rgb(path, 8 * 4 + 2, 15 * 4 + 2)  # left edge of the box (pixel 8 spans 32..35): yellow
    assert r > 180 and g > 150 and b < 100
    # default zoom: the long side reaches 512 pixels
    assert Image.open(save_overlay(image, gt, pred, tmp_path / "d.png")).size == (60 * 9, 40 * 9)


def test_overlay_label_maps_dicts_and_slice_result_prompts(tmp_path, slice_2d):
    image, gt, pred = slice_2d
    labels = gt.astype(np.uint8) + 2 * np.roll(gt, 25, axis=1)
    prompts = [("point", SimpleNamespace(x=20, y=20, positive=True)), ("box", np.array([10, 10, 30, 30]))]
    save_overlay(image, labels, labels, tmp_path / "labels.png", class_names={1: "liver", 2: "kidney"})
    path = save_overlay(image, labels, {1: pred}, tmp_path / "dict.png", "title", prompts, zoom=2)
    r, g, b = rgb(path, 20 * 2 + 1, 20 * 2 + 1)
    assert g > r + 60  # the click recorded by the evaluation is drawn

    class Click(NamedTuple):  # as samadapt.prompts.Click: a 3-tuple that must not be read as (x, y) pairs
        x: float
        y: float
        positive: bool

    path = save_overlay(image, gt, pred, tmp_path / "clicks.png", points=[Click(50, 8, False)], zoom=2)
    r, g, b = rgb(path, 50 * 2 + 1, 8 * 2 + 1)
    assert r > g + 60  # a negative click at (x, y) = (50, 8)
    with pytest.raises(ValueError, match="point labels"):
        save_overlay(image, gt, pred, tmp_path / "x.png", points=[[1, 2], [3, 4]], point_labels=[1])
    with pytest.raises(ValueError, match="match"):
        save_overlay(image, gt[:20], pred[:20], tmp_path / "x.png")


def test_overlay_grid_size(tmp_path, slice_2d):
    image, gt, pred = slice_2d
    items = [OverlayItem(image, gt, pred, f"slice {k}") for k in range(4)]
    items.append({"image": image, "gt": gt, "pred": pred, "title": "as a dict", "boxes": [10, 10, 30, 30]})
    path = save_overlay_grid(items, tmp_path / "grid.png", columns=3, panel_px=120)
    assert Image.open(path).size == (3 * 120, 2 * (80 + 24))  # panels follow the 40 x 60 aspect, plus titles
    with pytest.raises(ValueError):
        save_overlay_grid([], tmp_path / "none.png")


def test_loss_curve_from_rows_and_from_the_trainer_csv(tmp_path):
    rows = [{"step": s, "loss": 1 / s, "lr": 1e-3} for s in range(1, 21)]
    rows[9]["val_dice"] = 0.5
    rows[19]["val_dice"] = 0.7
    assert Image.open(save_loss_curve(rows, tmp_path / "a.png")).size == (800, 600)
    csv_path = tmp_path / "metrics.csv"
    # as the trainer writes it: empty val_dice cells between validations
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["step", "loss", "lr", "val_dice", "seconds_per_step"], restval="")
        writer.writeheader()
        writer.writerows(rows)
    assert Image.open(save_loss_curve(csv_path, tmp_path / "b.png")).size == (800, 600)
    no_val = [{k: v for k, v in r.items() if k != "val_dice"} for r in rows]
    assert Image.open(save_loss_curve(no_val, tmp_path / "c.png")).size == (800, 360)
    with pytest.raises(ValueError, match="loss"):
        save_loss_curve([{"step": 1, "lr": 0.1}], tmp_path / "d.png")


def accumulated():
    """Two volumes, two classes; the tumour is absent from case b in both masks (NaN, excluded)."""
    acc = MetricAccumulator(["liver", "tumour"])
    gt = np.zeros((4, 16, 16), np.uint8)
    gt[1:3, 2:10, 2:10] = 1
    gt[1:3, 11:14, 11:14] = 2
    acc.add("a", compute_case_metrics(np.roll(gt, 1, axis=2), gt, {1: "liver", 2: "tumour"}, (3.0, 0.8, 0.8)))
    gt[gt == 2] = 0
    acc.add("b", compute_case_metrics(gt, gt, {1: "liver", 2: "tumour"}, (3.0, 0.8, 0.8)))
    return acc


def test_metrics_files_are_strict_json_and_one_csv_row_per_case_and_class(tmp_path):
    acc = accumulated()
    summary = acc.aggregate()
    assert math.isnan(acc.rows[-1]["dice"])  # the excluded case is really NaN before writing
    json_path, csv_path = write_metrics_files(tmp_path / "out", {**summary, "prompt": "box", "seed": 3}, acc.rows)
    document = strict_loads(json_path.read_text(encoding="utf-8"))
    assert {"mean_dice", "per_class", "prompt", "cases", "empty_mask_conventions"} <= set(document)
    assert document["prompt"] == "box" and document["cases"] == 2 and document["seed"] == 3
    assert set(document["per_class"]["tumour"]) >= {"dice", "hd95_mm", "iou", "nsd", "cases"}
    assert isinstance(document["mean_dice"], float)
    with csv_path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["case"], r["class"]) for r in rows] == [("a", "liver"), ("a", "tumour"), ("b", "liver"), ("b", "tumour")]
    assert rows[3]["dice"] == "" and float(rows[2]["dice"]) == 1.0  # NaN -> empty cell
    back = aggregate(rows)["per_class"]  # the CSV reads back to the same means and counts
    for name, values in summary["per_class"].items():
        assert back[name]["hd95_mm"] == pytest.approx(values["hd95_mm"]) and back[name]["cases"] == values["cases"]
    # NaN anywhere (even in extra keys) is written as null
    write_metrics_files(tmp_path / "nan", {**summary, "prompt": "none", "extra": [math.nan, np.float32(1.5)]}, [])
    assert strict_loads((tmp_path / "nan" / "metrics.json").read_text(encoding="utf-8"))["extra"] == [None, 1.5]
    with pytest.raises(ValueError, match="prompt"):
        write_metrics_files(tmp_path / "bad", summary, acc.rows)
    with pytest.raises(ValueError, match="hd95_mm"):
        write_metrics_files(
            tmp_path / "bad", {"mean_dice": 1.0, "per_class": {"x": {"dice": 1.0}}, "prompt": "box"}, []
        )


def test_markdown_table():
    rows = [{"class": "a|b", "dice": 0.91234, "hd95_mm": math.nan}, ["c", 0.5, 12.345]]
    text = markdown_table(rows, ["class", "dice", "hd95_mm"], formats={"hd95_mm": ".1f"})
    lines = text.splitlines()
    assert lines[0] == "| class | dice | hd95_mm |" and lines[1] == "|---|---|---|"
    assert lines[2] == "| a\\|b | 0.912 | n/a |" and lines[3] == "| c | 0.500 | 12.3 |"
    with pytest.raises(ValueError, match="cells"):
        markdown_table([[1, 2]], ["one"])


def test_comparison_report_is_self_contained(tmp_path, slice_2d):
    image, gt, pred = slice_2d
    out = tmp_path / "report"
    inside = save_overlay(image, gt, pred, (out.mkdir() or out) / "inside.png", zoom=1)
    outside = save_overlay(image, gt, pred, tmp_path / "outside.png", zoom=1)
    adapted = accumulated().aggregate()
    baseline = {**adapted, "mean_dice": adapted["mean_dice"] - 0.1, "mean_hd95_mm": adapted["mean_hd95_mm"] + 2.0}
    table = comparison_section(adapted, baseline, adapted_name="LoRA", baseline_name="LiteMedSAM")
    md_path, html_path = write_report(
        out,
        "LiteMedSAM + LoRA <test>",
        [
            TextSection("Setup", "Box prompts, seed 0.\n\n- liver\n- tumour"),
            table,
            ImageSection("Examples", [inside, outside], ["inside", "outside"]),
        ],
    )
    md, page = md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")
    assert "| mean over classes |" in md and "+0.100" in md and "-2.00" in md  # Dice up by 0.1, HD95 down by 2 mm
    assert "](inside.png)" in md and "](images/outside.png)" in md and (out / "images" / "outside.png").exists()
    assert EMPTY_MASK_CONVENTIONS in md and EMPTY_MASK_CONVENTIONS in page
    assert page.count("data:image/png;base64,") == 2
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:") for s in sources)  # nothing outside the file
    assert "<link" not in page and "<script" not in page and "&lt;test&gt;" in page
    assert '<td class="good">+0.100</td>' in page and '<td class="good">-2.00</td>' in page
    assert "<li>tumour</li>" in page
    with pytest.raises(FileNotFoundError):
        write_report(out, "x", [ImageSection("missing", [tmp_path / "nope.png"])])
    with pytest.raises(ValueError, match="captions"):
        ImageSection("x", [inside], ["a", "b"])


def test_save_evaluation(tmp_path, slice_2d):
    image, gt, pred = slice_2d

    def evaluation(name, shift):
        labels = gt.astype(np.uint8)
        slices = [
            SimpleNamespace(
                case=f"c{k}",
                slice=k,
                image=image,
                gt=labels,
                pred={1: np.roll(gt, shift + k, axis=1)},
                prompts=[("point", SimpleNamespace(x=20, y=20, positive=True))],
            )  # fmt: skip
            for k in range(3)
        ]
        acc = MetricAccumulator(["organ"])
        for s in slices:
            acc.add(s.case, {"organ": compute_case_metrics(s.pred[1].astype(int), s.gt, {1: "organ"}, 1.0)["organ"]})
        summary = acc.aggregate()
        metrics = {**summary, "prompt": "point:1", "model": name, "units": 3}
        return SimpleNamespace(model=name, protocol="point:1", rows=acc.rows, summary=summary, slices=slices,
                               metrics_json=lambda: dict(metrics))  # fmt: skip

    out = tmp_path / "eval"
    metrics = save_evaluation(out, evaluation("adapted", 0), evaluation("lite_medsam", 4))
    document = strict_loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert document["prompt"] == "point:1" and "baseline" in document and metrics["model"] == "adapted"
    assert len(list(csv.DictReader((out / "metrics.csv").open(encoding="utf-8")))) == 6
    assert sorted(p.name for p in out.glob("overlay_*.png")) == [
        "overlay_class1_best.png", "overlay_class1_median.png", "overlay_class1_worst.png"
    ]  # fmt: skip
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 3 and "Dice change" in page


def test_table_section_defaults():
    table = TableSection("t", ["a"], [[1]])
    assert table.formats == {} and table.better == {} and table.note == ""
