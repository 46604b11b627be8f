"""Interactive segmentation of a volume (``interactive.VolumeObject``) and the interactive protocol
(``evaluate --prompt interactive:N``): where the clicks go, what a click changes, when re-propagation stops."""

import json

import numpy as np
import pytest

from samadapt.eval.interactive import area_under, score_object, summarise
from samadapt.interactive import VolumeObject, edit_box
from samadapt.prediction import Prediction
from samadapt.prompts import Click, box_from_mask


class SlipperyModel:
    """A stand-in for SAM's decoder with a known failure: inside the box it answers the object, except on the
    ``slips`` slices, where it misses the object's left half unless a positive click lies there. Its low-res
    logits are filled with the slice index, so a test can see whose logits came back as ``mask_input``."""

    device, cache_size, select_single_click, run = "cpu", 0, True, None

    def __init__(self, volume, slips):
        self.volume, self.slips = volume, set(slips)
        self.index, self.encoded, self.asked = None, [], []

    def set_image(self, image, preprocessed=False, cache_key=None):
        self.index = cache_key
        self.encoded.append(cache_key)

    def predict(self, points=None, labels=None, boxes=None, mask_input=None, multimask_output=None, text=None):
        memory = None if mask_input is None else int(np.asarray(mask_input).flat[0])
        self.asked.append((self.index, None if points is None else len(points), memory))
        mask = self.volume[self.index].copy()
        if boxes is not None:
            x0, y0, x1, y1 = (int(v) for v in boxes)
            inside = np.zeros_like(mask)
            inside[y0 : y1 + 1, x0 : x1 + 1] = True
            mask &= inside
        clicked = points is not None and any(label == 1 for label in labels)
        if self.index in self.slips and not clicked:
            columns = np.flatnonzero(mask.any(axis=0))
            mask[:, : columns[len(columns) // 2]] = False if len(columns) else mask[:, :0]
        logits = np.full((1, 1, 8, 8), float(self.index), np.float32)
        return Prediction(mask[None, None], np.ones((1, 1), np.float32), logits)


def wrong_slices(mask, gt):
    return [z for z in range(len(gt)) if (mask[z] != gt[z]).any()]


def cylinder(depth=12, side=32):
    volume = np.zeros((depth, side, side), bool)
    volume[2:10, 8:24, 6:26] = True
    return volume


def test_a_box_then_a_click_fixes_the_slipped_slice_and_stops_where_nothing_changes():
    gt = cylinder()
    model = SlipperyModel(gt, slips={5, 6})
    volume_object = VolumeObject(model, lambda i: model.set_image(None, cache_key=i), gt.shape, margin=0)
    written = volume_object.start(2, 9, box_from_mask(gt.any(axis=0)))
    assert written == [5, 6, 7, 8, 9, 4, 3, 2]  # the middle slice first, forward, then backward
    # 5 and 6 slipped; 7-9 took the box of 6's partial mask; backward, 4 starts again from the volume box
    assert wrong_slices(volume_object.mask, gt) == [5, 6, 7, 8, 9]
    changed = volume_object.click(5, Click(8.0, 15.0, True))
    assert volume_object.clicks == {5: [Click(8.0, 15.0, True)]} and (volume_object.mask[5] == gt[5]).all()
    # forward, each slice took a wider box than before and changed; backward, 4 came back as it was: stop there
    assert changed == [5, 6, 7, 8, 9, 4]
    assert wrong_slices(volume_object.mask, gt) == [6, 7, 8, 9]  # 6 slips without a click of its own


def test_memory_passes_the_neighbours_logits_and_a_clicked_slice_its_own():
    gt = cylinder()
    model = SlipperyModel(gt, slips=())
    volume_object = VolumeObject(model, lambda i: model.set_image(None, cache_key=i), gt.shape, memory=True, margin=0)
    volume_object.start(2, 9, box_from_mask(gt.any(axis=0)))
    memory = {index: came for index, _, came in model.asked}
    assert memory[5] is None and memory[6] == 5 and memory[7] == 6 and memory[4] == 5 and memory[3] == 4
    model.asked.clear()
    volume_object.click(7, Click(12.0, 12.0, False))
    assert model.asked[0] == (7, 1, 7)  # its own previous logits, with the click
    plain = VolumeObject(model, lambda i: model.set_image(None, cache_key=i), gt.shape, margin=0)
    model.asked.clear()
    plain.start(2, 9, box_from_mask(gt.any(axis=0)))
    assert all(came is None for _, _, came in model.asked)


def test_the_protocol_scores_every_step_and_the_challenges_areas():
    gt = cylinder()
    model = SlipperyModel(gt, slips={4, 5, 6, 7})
    volume_object = VolumeObject(model, lambda i: model.set_image(None, cache_key=i), gt.shape, margin=0)
    result = score_object(volume_object, gt, (2.0, 1.0, 1.0), clicks=3, tolerance_mm=1.0)
    dice = result["dice_steps"]
    assert len(dice) == len(result["nsd_steps"]) == 4 and dice[0] < 1.0
    assert (
        all(a < b for a, b in zip(dice, dice[1:], strict=False)) and dice[-1] > 0.9
    )  # every click fixes part of the misses
    assert result["dsc_auc"] == pytest.approx((dice[1] + dice[2]) / 2 + (dice[2] + dice[3]) / 2)
    assert result["clicks_to_target"] == next(k for k, d in enumerate(dice) if d >= 0.9)
    # all misses, one 3D component; the first click goes to slice 7, which misses the most (7 of its 8 eighths)
    assert result["clicks"][0][0] == 7 and all(c[3] == 1 for c in result["clicks"]) and len(result["clicks"]) == 3
    assert area_under([1.0] * 5) == 4.0 and area_under([0.0, float("nan"), 1.0]) == 0.5
    curves = [{"class": "a", **result}, {"class": "a", **{**result, "dsc_auc": 0.0, "clicks_to_target": None}}]
    summary = summarise(curves, ["a", "b"], 3)
    assert summary["per_class"]["b"] == {} and summary["per_class"]["a"]["objects"] == 2
    assert summary["per_class"]["a"]["reached_target"] == 1
    assert summary["dsc_auc"] == pytest.approx(result["dsc_auc"] / 2)


@pytest.mark.slow
def test_evaluate_interactive_on_a_real_ct_crop_writes_curves_and_the_report(tmp_path):
    from samadapt.cli import main
    from samadapt.data.dataset_writer import write_msd_dataset
    from samadapt.data.io import read_label, read_volume
    from tests.data.conftest import write_nifti
    from tests.data.dicom_series import ABDOMEN, crop

    image = read_volume(ABDOMEN / "imagesTr" / "s0009.nii.gz")
    label = read_label(ABDOMEN / "labelsTr" / "s0009.nii.gz")
    z, y, x = slice(168, 185), slice(0, 119), slice(0, 119)  # the spleen (class 7) on its 14 slices, and 3 more
    image, label = crop(image, z, y, x), crop(label, z, y, x)
    label.array[...] = np.where(label.array == 7, 1, 0)
    root = tmp_path / "spleen"
    for folder, volume in (("imagesTr", image), ("labelsTr", label)):
        xyz = np.ascontiguousarray(volume.array.transpose(2, 1, 0))
        write_nifti(root / folder / "s.nii.gz", xyz, zooms=(1.5, 1.5, 1.5), affine=volume.affine)
    write_msd_dataset(root, ["s.nii.gz"], {1: "spleen"}, "CT", "ct_abdomen")
    out = tmp_path / "report"
    argv = ["evaluate", "--run", "lite_medsam", "--data", str(root), "--prompt", "interactive:3", "--out", str(out)]
    assert main([*argv, "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    curve = metrics["interactive"]
    assert metrics["prompt"] == "interactive:3" and curve["clicks"] == 3 and curve["memory"] is False
    assert curve["clicks_as"] == "points"
    steps = curve["per_class"]["spleen"]["dice_steps"]
    assert len(steps) == 4 and steps[0] > 0.7  # LiteMedSAM from a box on a real organ
    assert steps[-1] >= steps[0]  # the clicks do not make it worse
    assert curve["final_dice"] == pytest.approx(metrics["per_class"]["spleen"]["dice"])
    assert (out / "interactive_dice.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "Interactive segmentation" in report and "DSC-AUC" in report


def test_a_click_edits_the_box_as_a_user_drags_its_edges():
    box = np.array([10, 10, 30, 20], np.float32)
    # positive outside: the nearest edges move out to the click, margin beyond, within the slice
    np.testing.assert_array_equal(edit_box(box, Click(35.0, 15.0, True), 2, (40, 40)), [10, 10, 37, 20])
    np.testing.assert_array_equal(edit_box(box, Click(39.0, 2.0, True), 2, (40, 40)), [10, 0, 39, 20])
    # negative inside: the edge nearest to the click moves in, one pixel past it
    np.testing.assert_array_equal(edit_box(box, Click(27.0, 15.0, False), 2, (40, 40)), [10, 10, 26, 20])
    np.testing.assert_array_equal(edit_box(box, Click(20.0, 11.0, False), 2, (40, 40)), [10, 12, 30, 20])
    np.testing.assert_array_equal(edit_box(box, Click(5.0, 5.0, False), 2, (40, 40)), box)  # outside: no change
    np.testing.assert_array_equal(edit_box(None, Click(5.0, 5.0, True), 2, (40, 40)), [3, 3, 7, 7])
    assert edit_box(None, Click(5.0, 5.0, False), 2, (40, 40)) is None


def test_box_mode_sends_no_point_and_the_box_follows_the_clicks():
    gt = cylinder()
    model = SlipperyModel(gt, slips={5})
    volume_object = VolumeObject(
        model, lambda i: model.set_image(None, cache_key=i), gt.shape, margin=0, clicks_as="box"
    )
    volume_object.start(2, 9, box_from_mask(gt[5]))
    before = box_from_mask(volume_object.mask[5])
    model.asked.clear()
    volume_object.click(5, Click(7.0, 15.0, True))  # in the missed left half
    assert all(points is None for _, points, _ in model.asked)
    np.testing.assert_array_equal(volume_object.boxes[5], [7, before[1], before[2], before[3]])
    with pytest.raises(ValueError, match="clicks_as"):
        VolumeObject(model, lambda i: None, gt.shape, clicks_as="voice")
