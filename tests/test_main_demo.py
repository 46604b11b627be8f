"""The main job end to end: the quick demo on the real data and the real LiteMedSAM weights."""

import json

import pytest

from samadapt.cli import main


@pytest.mark.slow
def test_quick_demo_writes_the_report_and_adaptation_beats_the_baseline(tmp_path, demo_data, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--cache", str(demo_data["lesions"].parent)]) == 0
    for name in ("report.md", "report.html", "summary.json", "lesions_run/loss_curve.png", "mni152_run/loss_curve.png"):
        assert (out / name).is_file(), name
    assert len(list((out / "figures").glob("*.png"))) >= 6
    summary = json.loads((out / "summary.json").read_text())
    lesions = summary["lesions"]
    # LiteMedSAM was trained on boxes: even with SAM's best-of-three answer to one click, a click is far below a box
    assert lesions["baseline_point_dice"] < lesions["baseline_box_dice"] - 0.2
    assert lesions["adapted_point_dice"] > lesions["baseline_point_dice"] + 0.15
    page = (out / "report.html").read_text()
    assert "data:image/png;base64" in page and "Cheap Lunch" in page  # self-contained, with the table
    printed = capsys.readouterr().out
    assert "mean Dice" in printed and str(out / "report.html") in printed
