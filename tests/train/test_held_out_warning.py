"""The end-of-run checks ask the model a user gets (the run's peft.blend) and warn when a prompted run predicts on its
own training slices but nothing on held-out ones (issue 30: text-prompted msa runs scored 0 there, silently)."""

import json

import torch

from samadapt.peft import current_blend
from samadapt.train.diagnostics import collapse_warnings
from tests.train.test_trainer import make_trainer


def _foreground_on_training_slices_only(trainer) -> list[float]:
    """Make the model answer foreground on the training slices' images and background elsewhere (a fault injected
    in its decoder); returns the blends the decoder was called at."""
    train_sums = {round(float(s.image.sum()), 3) for s in trainer.data}
    encode, decode = trainer.model.encode_image, trainer.model.decode
    state, blends = {"train": False}, []

    def encode_image(images):
        state["train"] = round(float(images.sum()), 3) in train_sums
        return encode(images)

    def answer(embeddings, *args, **kwargs):
        logits, iou = decode(embeddings, *args, **kwargs)
        blends.append(current_blend(trainer.model))
        return torch.full_like(logits, 10.0 if state["train"] else -10.0), iou

    trainer.model.encode_image, trainer.model.decode = encode_image, answer
    return blends


def test_nothing_on_held_out_slices_is_reported_and_the_probes_use_the_runs_blend(tmp_path):
    trainer = make_trainer(tmp_path, "msa", (1,), **{"train.steps": 1})  # msa: blend 0.5
    assert trainer.config.peft.blend == 0.5 and trainer.val_items
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    trainer.history = [{"step": 1, "loss": 0.5, "val_dice": 0.3}]
    blends = _foreground_on_training_slices_only(trainer)
    found = collapse_warnings(trainer)
    assert len(found) == 1 and "nothing on 2 held-out slices" in found[0]
    saved = json.loads((tmp_path / "warnings.json").read_text())
    assert saved["foreground_pixels_on_held_out_slices"] == 0 and saved["foreground_pixels_on_training_slices"] > 0
    assert blends and set(blends) == {0.5}  # the model a user of the run gets
    assert current_blend(trainer.model) == 1.0  # and training's own afterwards


def test_no_held_out_warning_when_held_out_slices_get_an_answer(tmp_path):
    from samadapt.train.samples import prepare_slice

    trainer = make_trainer(tmp_path, "cheap-lunch", (1,), **{"train.steps": 1})
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    trainer.history = [{"step": 1, "loss": 0.5, "val_dice": 0.3}]
    extra = [prepare_slice(item, trainer.model.img_size) for item in trainer.val_items]
    trainer.data = trainer.train_slices = [*extra, *trainer.data]  # the held-out images answered too
    _foreground_on_training_slices_only(trainer)
    assert collapse_warnings(trainer) == []
    assert json.loads((tmp_path / "warnings.json").read_text())["foreground_pixels_on_held_out_slices"] > 0
