"""Encoder pre-training (MSA: MAE, e-Mix, ShED) on the real demo scans with the real LiteMedSAM weights."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from samadapt.cli import main
from samadapt.data.datasets import SliceDataset, load_dataset
from samadapt.peft.inject import is_peft_key
from samadapt.peft.pretrained import encoder_peft_names
from samadapt.pretrain import PretrainConfig, PretrainedInitError, build_pretrainer, load_pretrained_encoder
from samadapt.pretrain.config import pretrain_defaults
from samadapt.pretrain.data import collate, unlabelled_slices
from samadapt.train.api import adapted_model
from samadapt.train.config import TrainConfig, apply_overrides, from_dict
from samadapt.train.recipes import recipe_defaults


@pytest.fixture(scope="module")
def small_scans(tmp_path_factory):
    """One labelled lesion case (breast MRI, 21 slices) and one unlabelled test image (brain MRI, 23 slices)."""
    import os

    from samadapt.data.demo import fetch_demo

    source = fetch_demo(os.environ.get("SAMADAPT_CACHE") or str(tmp_path_factory.mktemp("cache")))["lesions"]
    root = tmp_path_factory.mktemp("scans") / "lesions-small"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    shutil.copy(source / "imagesTr" / "breast1.nrrd", root / "imagesTr")
    shutil.copy(source / "labelsTr" / "breast1.nrrd", root / "labelsTr")
    shutil.copy(source / "imagesTr" / "brain2.nrrd", root / "imagesTs")
    meta = json.loads((source / "dataset.json").read_text())
    meta["training"] = [{"image": "./imagesTr/breast1.nrrd", "label": "./labelsTr/breast1.nrrd"}]
    meta["numTraining"] = 1
    meta["test"] = ["./imagesTs/brain2.nrrd"]
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def config_for(data, method: str, recipe: str = "cheap-lunch", *overrides: str) -> PretrainConfig:
    values = pretrain_defaults(recipe)
    base = [f"method={method}", f"data.path={data}", "train.batch_size=2", "data.workers=0"]
    base += ["train.precision=fp32", "optim.warmup_steps=0", "optim.schedule=constant"]
    return from_dict(PretrainConfig, apply_overrides(values, base + list(overrides)))


def test_unlabelled_slices_take_every_image_and_test_image_labels_ignored(small_scans):
    slices = unlabelled_slices(str(small_scans))
    assert [c.id for c in slices.cases] == ["breast1", "brain2"]
    assert all(c.label is None for c in slices.cases)
    assert len(slices) == 21 + 23
    item = slices[len(slices) - 1]  # a slice of the test image, through the same preprocessing and cache
    assert item["case"] == "brain2" and item["label"].shape == item["image"].shape[:2] and not item["label"].any()
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    labelled = SliceDataset(load_dataset(small_scans))  # the labelled view is untouched by the unlabelled one
    assert len(labelled) == 21 and labelled[5]["label"].shape == slices[5]["image"].shape[:2]
    np.testing.assert_array_equal(labelled[5]["image"], slices[5]["image"])
    again = unlabelled_slices(str(small_scans), test_images=False)
    assert len(again) == 21


@pytest.mark.slow
@pytest.mark.parametrize(("method", "recipe"), [("mae", "msa"), ("shed", "cheap-lunch"), ("emix", "cheap-lunch")])
def test_each_objective_loss_falls_and_only_encoder_peft_and_heads_train(small_scans, tmp_path, method, recipe):
    """One optimiser step on one batch of two real slices (a breast and a brain MRI slice), with the same random
    masks / shuffles / mixing as the measurement: the objective's loss on that batch goes down. The gradients of
    that step reach exactly the encoder's PEFT parameters (MSA adapters or LoRA) and the heads."""
    trainer = build_pretrainer(config_for(small_scans, method, recipe, "optim.lr=3e-3"), tmp_path, False)
    images, resized = collate([trainer.inputs[i] for i in (10, 30)])
    trainer._next_batch = lambda: (images, resized)

    def measured() -> float:
        trainer.objectives.rng = np.random.default_rng(7)
        trainer.model.eval()
        with torch.no_grad():
            return float(trainer.batch_losses(images, resized)["loss"])

    before = measured()
    trainer.objectives.rng = np.random.default_rng(7)
    trainer.train_step()
    after = measured()
    assert after < before - 1e-3, (method, before, after)
    if method == "shed":
        assert before == pytest.approx(np.log(2), abs=0.05)  # balanced BCE starts at chance

    graded = {name for name, p in trainer.model.named_parameters() if p.grad is not None}
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert graded == trainable == encoder_peft_names(trainer.model)
    assert all(name.startswith("image_encoder.") and is_peft_key(name) for name in graded)
    assert not any(is_peft_key(name) for name, _ in trainer.model.mask_decoder.named_parameters())
    kinds = {"msa": ("attn_adapter.", "mlp_adapter."), "cheap-lunch": ("lora_A_", "lora_B_")}[recipe]
    assert all(any(kind in name for name in graded) for kind in kinds)
    # the zero-initialised halves (adapter up-projection, LoRA B) moved
    zero_init = [
        p for name, p in trainer.model.named_parameters() if name in graded and (".up." in name or "lora_B" in name)
    ]
    assert zero_init and all(float(p.detach().abs().sum()) > 0 for p in zero_init)
    assert all(p.grad is not None for p in trainer.heads.parameters())


@pytest.mark.slow
def test_cli_pretrain_resume_then_train_init_loads_the_values(small_scans, tmp_path, capsys):
    run = tmp_path / "pre"
    common = ["--data", str(small_scans), "--out", str(run), "--method", "shed", "--recipe", "cheap-lunch"]
    common += ["--set", "train.batch_size=2", "--set", "data.workers=0", "--device", "cpu"]
    assert main(["pretrain", *common, "--steps", "1"]) == 0
    assert main(["pretrain", *common, "--steps", "2", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("step,loss")
    last = run / "checkpoints" / "last"
    for name in ("adapter_model.safetensors", "adapter_config.json", "pretrain_heads.safetensors", "checksums.json"):
        assert (last / name).is_file()
    assert (run / "checkpoints" / "best").is_dir() and (run / "config.yaml").is_file()
    manifest = json.loads((last / "adapter_config.json").read_text())
    assert manifest["task"] == "pretrain" and manifest["step"] == 2 and manifest["pretrain"]["method"] == "shed"
    assert manifest["pretrain"]["slices"] == 44 and len(manifest["base_sha256"]) == 64
    assert manifest["peft"]["lora"]["decoder"] is False and manifest["peft"]["train_modules"] == []
    saved = load_file(str(last / "adapter_model.safetensors"))
    assert saved and all(k.startswith("image_encoder.") and is_peft_key(k) for k in saved)  # no head, no decoder
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if "lora_B" in k)  # trained, not the init

    # the Python API: a fine-tuning model built with model.init carries exactly those values
    data = apply_overrides(recipe_defaults("cheap-lunch"), [f"data.path={small_scans}", f"model.init={run}"])
    model, entry = adapted_model(from_dict(TrainConfig, data), {1: "lesion"})
    params = dict(model.named_parameters())
    assert set(saved) == encoder_peft_names(model) and entry["init"]["method"] == "shed"
    for key, value in saved.items():
        assert torch.equal(params[key].detach(), value)
    decoder_b = [v for k, v in params.items() if k.startswith("mask_decoder.") and "lora_B" in k]
    assert decoder_b and all(float(v.detach().abs().sum()) == 0 for v in decoder_b)  # only the encoder was pre-trained

    # the CLI: train --init runs, and its manifest names the pre-training run
    out = tmp_path / "fine"
    args = ["train", "--recipe", "cheap-lunch", "--data", str(small_scans), "--out", str(out), "--init", str(run)]
    assert (
        main([*args, "--steps", "1", "--device", "cpu", "--set", "data.workers=0", "--set", "train.batch_size=1"]) == 0
    )
    fine = json.loads((out / "checkpoints" / "last" / "adapter_config.json").read_text())
    assert fine["init"]["run"] == str(run)

    # a pre-training run is no model to segment with: evaluate / predict refuse it in one line
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--data", str(small_scans), "--out", str(tmp_path / "ev")]) == 2
    assert f"{run} is a pre-training run" in capsys.readouterr().err


@pytest.mark.slow
def test_init_refuses_another_base_model_or_other_slots(small_scans, tmp_path, capsys):
    run = tmp_path / "pre"
    trainer = build_pretrainer(config_for(small_scans, "mae", "cheap-lunch", "train.steps=1"), run, False)
    trainer._save("last")
    last = run / "checkpoints" / "last"
    data = apply_overrides(recipe_defaults("msa"), [f"data.path={small_scans}", f"model.init={run}"])
    with pytest.raises(PretrainedInitError, match="encoder PEFT slots"):
        adapted_model(from_dict(TrainConfig, data), {1: "lesion"})  # LoRA run into adapter slots
    data = apply_overrides(recipe_defaults("cheap-lunch"), [f"model.init={run}", "peft.lora.rank=8"])
    with pytest.raises(PretrainedInitError, match="another rank"):
        adapted_model(from_dict(TrainConfig, data), {1: "lesion"})
    manifest = json.loads((last / "adapter_config.json").read_text())
    manifest["base_sha256"] = "f" * 64  # as if pre-trained on other base weights
    (last / "adapter_config.json").write_text(json.dumps(manifest))
    model, _ = adapted_model(from_dict(TrainConfig, recipe_defaults("cheap-lunch")), {1: "lesion"})
    with pytest.raises(PretrainedInitError, match="other|base weights"):
        load_pretrained_encoder(model, run, "0" * 64)
    args = ["train", "--recipe", "cheap-lunch", "--data", str(small_scans), "--out", str(tmp_path / "x")]
    assert main([*args, "--init", str(run), "--steps", "1"]) == 2
    assert "pre-trained on base weights ffffffffffff" in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoints").exists()
    with pytest.raises(PretrainedInitError, match="not a pre-training run"):
        load_pretrained_encoder(model, tmp_path, "0" * 64)
