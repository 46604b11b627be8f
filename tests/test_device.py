"""Device choice in one place: CUDA by default where it exists (tested without a GPU), the CPU otherwise."""

import pytest
import torch

from samadapt.device import autocast, resolve_device


def test_the_default_is_cuda_when_available_and_the_local_rank_picks_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device() == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun's fourth process on a 2-GPU machine
    assert resolve_device(None) == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")  # an explicit choice is kept


def test_without_cuda_the_default_is_the_cpu_and_asking_for_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="no usable CUDA"):
        resolve_device("cuda:0")


def test_autocast_follows_the_precision():
    cpu = torch.device("cpu")
    with autocast(cpu, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        autocast(cpu, "fp16")


def test_the_trainer_and_the_predictor_take_the_resolved_device(tmp_path, monkeypatch):
    from samadapt.predict import Predictor
    from tests.conftest import make_tiny_sam
    from tests.train.test_trainer import make_trainer

    seen = []
    import samadapt.predict
    import samadapt.train.loop

    def fake_resolve(device=None):
        seen.append(device)
        return torch.device("cpu")

    monkeypatch.setattr(samadapt.train.loop, "resolve_device", fake_resolve)
    monkeypatch.setattr(samadapt.predict, "resolve_device", fake_resolve)
    make_trainer(tmp_path, **{"train.device": "cuda:1"})
    Predictor(make_tiny_sam(64), device="cuda:0")
    assert seen == ["cuda:1", "cuda:0"]
