"""Precision choice: ``auto`` takes bf16 only where the device computes it natively."""

import pytest

from samadapt.errors import TrainingError
from samadapt.precision import fast_bfloat16, resolve_precision
from samadapt.train.config import TrainConfig, apply_overrides, from_dict
from samadapt.train.recipes import recipe_defaults
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
