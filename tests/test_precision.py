"""Precision choice: ``auto`` takes bf16 only where the device computes it natively."""

import contextlib

import numpy as np
import pytest
import torch

from samadapt.cli import main
from samadapt.data import SliceDataset, load_dataset
from samadapt.device import autocast
from samadapt.errors import TrainingError
from samadapt.eval.metrics import dice
from samadapt.models import build_model
from samadapt.precision import fast_bfloat16, resolve_precision
from samadapt.predict import Predictor
from samadapt.prompts import box_from_mask
from samadapt.runs import Manifest, Run
from samadapt.train.config import TrainConfig, apply_overrides, from_dict
from samadapt.train.recipes import recipe_defaults
from tests.conftest import make_tiny_sam
from tests.train.test_trainer import make_trainer


def test_auto_follows_the_hardware(monkeypatch):
    import samadapt.precision as precision

    monkeypatch.setattr(precision, "fast_bfloat16", lambda device="cpu": True)
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(precision, "fast_bfloat16", lambda device="cpu": False)
    assert resolve_precision("auto") == "fp32"
    assert resolve_precision("bf16") == "bf16" and resolve_precision("fp32") == "fp32"


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="float8"):
        resolve_precision("float8")
    with pytest.raises(ValueError, match="precision"):
        from_dict(TrainConfig, apply_overrides(recipe_defaults("samed"), ["train.precision=half"]))


def test_trainer_resolves_auto_and_refuses_fp16_on_the_cpu(tmp_path):
    trainer = make_trainer(tmp_path, **{"train.precision": "auto"})
    assert trainer.precision == ("bf16" if fast_bfloat16("cpu") else "fp32")
    assert TrainConfig().train.precision == "auto"
    with pytest.raises(TrainingError, match="fp16"):
        make_trainer(tmp_path, **{"train.precision": "fp16"})


@pytest.mark.parametrize("native", [True, False])
def test_inference_default_is_bf16_only_where_the_device_computes_it_natively(monkeypatch, native):
    """One place decides (``precision.INFERENCE_PRECISION``): a bare model's Run and ``Predictor``'s default both
    resolve to bf16 autocast on native-bf16 hardware and to plain fp32 (no autocast) elsewhere; fp32 stays fp32."""
    import samadapt.precision as precision

    monkeypatch.setattr(precision, "fast_bfloat16", lambda device="cpu": native)
    cpu = torch.device("cpu")
    run = Run(model=make_tiny_sam(64), name="tiny")
    assert run.precision == precision.INFERENCE_PRECISION == "auto"
    predictor = Predictor(run.model, device="cpu")
    expected = "bf16" if native else "fp32"
    assert resolve_precision(predictor.precision, cpu) == resolve_precision(run.precision, cpu) == expected
    context = autocast(cpu, predictor.precision)
    if native:
        assert isinstance(context, torch.autocast) and context.fast_dtype == torch.bfloat16
    else:
        assert isinstance(context, contextlib.nullcontext)
    assert isinstance(
        autocast(cpu, Predictor(run.model, device="cpu", precision="fp32").precision), contextlib.nullcontext
    )
    manifest = Manifest("tiny", "0" * 64, {}, precision="fp32")  # an adapted run keeps its training precision
    assert Run(model=run.model, name="tiny", manifest=manifest).precision == "fp32"


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_precision_switch_reaches_predict_and_evaluate(monkeypatch, tmp_path, command):
    import samadapt.eval.evaluate as evaluate_module
    import samadapt.export.backend as backend
    import samadapt.predict as predict_module

    seen = {}
    monkeypatch.setattr(backend, "load_for_backend", lambda run, backend, device=None: Run(model=None, name=run))
    monkeypatch.setattr(predict_module, "predict_folder", lambda *a, **kw: seen.update(kw) or [])

    def fake_evaluate(*args, **kwargs):
        seen.update(kwargs)
        return {"mean_dice": 0.0, "prompt": "box", "cases": 0}

    monkeypatch.setattr(evaluate_module, "evaluate", fake_evaluate)
    if command == "predict":
        args = ["predict", "--run", "lite_medsam", "-i", str(tmp_path), "-o", str(tmp_path / "out")]
    else:
        args = ["evaluate", "--run", "lite_medsam", "--data", str(tmp_path), "--out", str(tmp_path / "report")]
    assert main([*args, "--precision", "fp32"]) == 0
    assert seen["precision"] == "fp32"
    seen.clear()
    assert main(args) == 0
    assert seen["precision"] is None  # None: the run's (a bare model: INFERENCE_PRECISION)


@pytest.mark.slow
@pytest.mark.skipif(not fast_bfloat16("cpu"), reason="bf16 inference is the default only on native-bf16 CPUs")
def test_bf16_inference_stays_close_to_fp32_on_real_slices(demo_data):
    """The default's accuracy condition on real data: bf16 masks agree with fp32 masks (box prompts from the label)."""
    slices = SliceDataset(load_dataset(demo_data["lesions"]))
    model = build_model("lite_medsam")
    fp32, bf16 = Predictor(model, device="cpu", precision="fp32"), Predictor(model, device="cpu", precision="bf16")
    agreement, gt_change = [], []
    for i in slices.indices([1])[::9]:  # 3 of the 27 labelled lesion slices
        item = slices[i]
        gt = item["label"] == 1
        predictions = []
        for predictor in (fp32, bf16):
            predictor.set_image(item["image"], preprocessed=True)
            predictions.append(predictor.predict(boxes=box_from_mask(gt)))
        masks = [prediction.masks[0, 0] for prediction in predictions]
        assert predictions[1].low_res_logits.dtype == torch.float32  # bf16 computes, fp32 comes back
        agreement.append(dice(masks[1], masks[0]))
        gt_change.append(dice(masks[1], gt) - dice(masks[0], gt))
    # measured on all 27 slices: mean agreement in docs/performance.md (issue 14 section)
    assert np.mean(agreement) >= 0.99
    assert abs(np.mean(gt_change)) < 0.005
