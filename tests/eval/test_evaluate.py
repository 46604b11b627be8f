"""Evaluation protocols and the evaluate / predict commands on the real demo data with the real LiteMedSAM."""

import json

import numpy as np
import pytest
import torch

import samadapt
from samadapt.cli import main
from samadapt.data import SliceDataset, load_dataset
from samadapt.data.io import read_volume
from samadapt.eval.evaluate import evaluate_slices, evaluate_slices_under
from samadapt.peft import PeftConfig, apply_peft
from samadapt.runs import Run, load_run


@pytest.fixture(scope="module")
def lesion_items(demo_data):
    slices = SliceDataset(load_dataset(demo_data["lesions"]))
    return [slices[i] for i in slices.indices([1], ["lung2", "brain1"])][:4]


@pytest.mark.parametrize("protocol", ["point:1", "box:6"])
def test_baseline_and_adapted_model_get_identical_prompts(lesion_items, protocol):
    baseline = load_run("lite_medsam")
    model = load_run("lite_medsam").model
    apply_peft(model, PeftConfig(method="lora", lora={"rank": 4, "decoder": True}, train_modules=[]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # a different model: different masks, same prompts
    adapted = Run(model.eval(), "lite_medsam", path=None)
    first = evaluate_slices(baseline, lesion_items, {1: "lesion"}, protocol, seed=3, progress=False)
    second = evaluate_slices(adapted, lesion_items, {1: "lesion"}, protocol, seed=3, progress=False)
    assert any(not np.array_equal(a.pred[1], b.pred[1]) for a, b in zip(first.slices, second.slices, strict=True))
    for a, b in zip(first.slices, second.slices, strict=True):
        assert len(a.prompts) == len(b.prompts) > 0
        for (kind_a, prompt_a), (kind_b, prompt_b) in zip(a.prompts, b.prompts, strict=True):
            assert kind_a == kind_b and str(prompt_a) == str(prompt_b)
    other_seed = evaluate_slices(baseline, lesion_items, {1: "lesion"}, protocol, seed=4, progress=False)
    if protocol.startswith("box:"):  # jitter is drawn from the seed
        assert any(str(a.prompts) != str(b.prompts) for a, b in zip(first.slices, other_seed.slices, strict=True))


def test_several_protocols_in_one_pass_equal_separate_evaluations(lesion_items):
    run = load_run("lite_medsam")
    together = evaluate_slices_under(run, lesion_items[:2], {1: "lesion"}, ["box", "point:2"], seed=1, progress=False)
    for protocol, evaluation in zip(["box", "point:2"], together, strict=True):
        alone = evaluate_slices(run, lesion_items[:2], {1: "lesion"}, protocol, seed=1, progress=False)
        assert evaluation.protocol == alone.protocol == protocol
        assert evaluation.rows == alone.rows and evaluation.summary == alone.summary


@pytest.mark.slow
def test_evaluate_and_predict_through_the_cli_on_real_volumes(tmp_path, demo_data, capsys):
    lesions = demo_data["lesions"]
    report = tmp_path / "report"
    args = ["evaluate", "--run", "lite_medsam", "--data", str(lesions), "--prompt", "box", "--baseline"]
    assert main([*args, "--cases", "lung2", "--out", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["prompt"] == "box" and metrics["cases"] == 1
    assert set(metrics["per_class"]) == {"lesion"} and metrics["per_class"]["lesion"]["hd95_mm"] > 0
    assert metrics["mean_dice"] > 0.6  # a tight box on a lung nodule: LiteMedSAM does well
    # the baseline of a bare model is the same model with the same prompts: identical numbers
    assert metrics["baseline"]["mean_dice"] == metrics["mean_dice"]
    for name in ("metrics.csv", "report.md", "report.html", "overlay_class1_best.png"):
        assert (report / name).is_file(), name
    # the Python API gives the same figures
    api = samadapt.evaluate("lite_medsam", lesions, "box", cases=["lung2"], progress=False)
    assert api["mean_dice"] == pytest.approx(metrics["mean_dice"], abs=1e-9)

    image_path = lesions / "imagesTr" / "lung2.nrrd"
    label = read_volume(lesions / "labelsTr" / "lung2.nrrd").array
    z = np.flatnonzero(label.reshape(label.shape[0], -1).any(1))
    ys, xs = np.nonzero(label[z].any(0))
    box = [[xs.min() - 2, ys.min() - 2, z.min(), xs.max() + 2, ys.max() + 2, z.max()]]
    out = tmp_path / "lung2_mask.nii.gz"
    assert (
        main(
            [
                "predict",
                str(image_path),
                "--run",
                "lite_medsam",
                "--boxes",
                json.dumps([[int(v) for v in box[0]]]),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    source, written = read_volume(image_path), read_volume(out)
    assert written.array.shape == source.array.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    predicted = written.array > 0
    overlap = 2 * (predicted & (label > 0)).sum() / (predicted.sum() + (label > 0).sum())
    assert overlap > 0.5, overlap  # a volume box propagated from its middle slice finds the nodule
    assert "wrote" in capsys.readouterr().out
