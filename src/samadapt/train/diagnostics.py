"""Loud checks at the end of a run (``collapse_warnings``): the all-background plateau, where a model answers "nothing
here" everywhere whatever its loss says, and a prompted model that answers on its training slices only."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

from samadapt.files import atomic_write_text
from samadapt.models.sam import takes_slice_position
from samadapt.peft import blended
from samadapt.peft.inject import train_mode
from samadapt.train.forward import slice_positions
from samadapt.train.samples import PreparedSlice

log = logging.getLogger(__name__)

# why a prompt-free run may find nothing (docs/accuracy.md, semantic half), said with its warnings
SEMANTIC_HINT = (
    "; prompt-free, a class is recognised by its look alone: where its look changes between cases (organ, modality, "
    "scanner) or it covers a few pixels, label slices of more cases, or use a prompted recipe (cheap-lunch)"
)


def collapse_warnings(trainer, probe_slices: int = 4) -> list[str]:
    """Loud checks at the end of a ``Trainer``'s run (``trainer``; not imported here: it calls these checks) for the
    all-background plateau; returns the warnings (also logged at WARNING
    and, on the writing rank, written to ``run_dir/warnings.json`` with the checks' numbers).

    - every validation Dice of the run is 0 (validation ran at least once);
    - on up to ``probe_slices`` training slices holding a learned class, the model predicts nothing: semantic, the
      argmax is background everywhere; prompted, a centre click on each object (text runs: its class name) gives an
      empty mask. The model fails on the very slices it was trained on: the run ended on the plateau, whatever the
      loss says;
    - prompted runs with held-out slices: it predicts something on its training slices but nothing on up to
      ``probe_slices`` held-out ones (a text run that learnt its slices by heart, issue 30).

    The probes ask the model a user gets: at the run's ``peft.blend``.
    """
    found: list[str] = []
    facts: dict = {}
    dices = [row["val_dice"] for row in trainer.history if "val_dice" in row and math.isfinite(row["val_dice"])]
    if dices and max(dices) == 0.0:
        found.append(
            f"validation Dice stayed at 0 in all {len(dices)} validations" + (SEMANTIC_HINT if trainer.semantic else "")
        )
    wanted = set(trainer.classes)
    holding = [i for i, s in enumerate(trainer.train_slices) if wanted & set(s.classes)][:probe_slices]
    source = getattr(trainer, "data", trainer.train_slices)  # prepared slices (``train_slices`` may be infos)
    probes = [source[i] for i in holding]
    if probes and trainer.config.train.depth_slices == 1:
        from samadapt.train.samples import prepare_slice

        held = [] if trainer.semantic else [it for it in trainer.val_items if wanted & set(np.unique(it["label"]))]
        held = [prepare_slice(it, trainer.model.img_size) for it in held[:probe_slices]]
        trainer.model.eval()
        with torch.no_grad(), trainer._autocast(), blended(trainer.model, trainer.config.peft.blend):
            predicted = _foreground(trainer, probes)
            held_out = _foreground(trainer, held) if held else None
        train_mode(trainer.model)
        facts["foreground_pixels_on_training_slices"] = predicted
        if predicted == 0:
            found.append(
                f"the model predicts only background on {len(probes)} of its own training slices (all-background "
                "plateau): try a lower optim.lr, more steps, or more exemplars"
                + (SEMANTIC_HINT if trainer.semantic else "")
            )
        if held_out is not None:
            facts["foreground_pixels_on_held_out_slices"] = held_out
            if held_out == 0 and predicted > 0:
                found.append(
                    f"the model predicts nothing on {len(held)} held-out slices holding a learned class, although it "
                    "does on its training slices: it learnt them by heart; label more slices, or for text prompts "
                    "train with clicks too (prompt.kind=text-mixed)"
                )
    losses = [row["loss"] for row in trainer.history]
    if found and len(losses) >= 4:
        facts["first_loss"], facts["last_loss"] = float(np.mean(losses[:2])), float(np.mean(losses[-2:]))
    for message in found:
        log.warning("%s: %s", trainer.run_dir, message)
    if trainer.is_writer and trainer.run_dir.exists():
        atomic_write_text(trainer.layout.warnings, json.dumps({"warnings": found, **facts}, indent=2))
    return found


def _foreground(trainer, items: Sequence[PreparedSlice]) -> int:
    """Foreground pixels the model predicts on prepared slices: semantic, the argmax; prompted, per learned class
    present, its class name (text runs) or one centre click answered by the default one-click rule (``one_click_best``)."""
    from samadapt.prompts import centre_click
    from samadapt.selection import best_candidate, one_click_best

    predicted = 0
    select = one_click_best(trainer.manifest.to_dict())
    for item in items:
        embedding = trainer.model.encode_image(item.image[None].to(trainer.device))
        if trainer.semantic:
            position = slice_positions([item]) if takes_slice_position(trainer.model) else None
            logits, _ = trainer.model.decode(embedding, slice_position=position)
            predicted += int((logits.argmax(1) > 0).sum())
            continue
        for class_id in sorted(set(trainer.classes) & set(item.classes)):
            if getattr(trainer, "phrase_book", None) is not None:  # a text run: its class name, as text:name asks
                from samadapt.text.encoder import embed_phrases
                from samadapt.text.phrases import plain_name

                name = plain_name(trainer.phrase_book.for_class(class_id).name)
                logits, _ = trainer.model.decode(embedding, text=embed_phrases([name], trainer.device))
                predicted += int((logits > 0).sum())
                continue
            click = centre_click(item.label == class_id)
            coords = torch.tensor([[[click.x, click.y]]], dtype=torch.float32, device=trainer.device)
            labels = torch.ones(1, 1, dtype=torch.long, device=trainer.device)
            logits, scores = trainer.model.decode(embedding, (coords, labels), multimask_output=select)
            if select:
                logits, _ = best_candidate(logits, scores)
            predicted += int((logits > 0).sum())
    return predicted
