"""The text protocols of ``samadapt evaluate``: each class present on a slice is named by a phrase, and the model
segments it from the text alone.

``heldout``: a phrase of the run's phrase book that training never drew (a new wording of the class); ``name``: the
plain dataset.json class name. Only classes present on the slice are prompted, as the click and box protocols do,
so the numbers compare with theirs; how often the model answers "not here" for an absent class is not measured here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from samadapt.errors import RunError
from samadapt.predict import Predictor
from samadapt.runs import Run
from samadapt.text.phrases import PhraseBook, plain_name


def class_phrase(run: Run, class_id: int, phrase: str) -> str:
    """The phrase that names ``class_id`` under the protocol ``phrase`` (``heldout`` or ``name``)."""
    text = run.manifest.text if run.manifest else None
    if not text:
        raise RunError(f"{run.label} was not trained with text prompts (prompt.kind=text): no text protocol")
    entry = PhraseBook.from_dict(text).for_class(class_id)
    if phrase == "name":
        return plain_name(entry.name)
    if not entry.heldout:
        raise RunError(f"{run.label}: class {entry.name!r} has no held-out phrase in its phrase book")
    return entry.heldout[0]


def predict_text(predictor: Predictor, run: Run, item: dict, classes: Sequence[int], phrase: str, result):
    """Fill ``result.pred`` for every class of ``classes`` present in ``item``'s label, all in one decoder call."""
    present = [c for c in classes if (item["label"] == c).any()]
    if not present:
        return result
    texts = [class_phrase(run, c, phrase) for c in present]
    masks = predictor.predict(text=texts).masks[:, 0]
    for class_id, text, mask in zip(present, texts, masks, strict=True):
        result.pred[class_id] = np.asarray(mask, bool)
        result.prompts.append(("text", text))
    return result
