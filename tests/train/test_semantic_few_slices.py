"""Semantic (prompt-free) training from few slices: what the user is told when a run finds nothing (issue 18)."""

import json

import pytest

from samadapt.train.diagnostics import SEMANTIC_HINT, collapse_warnings
from tests.train.test_class_balance import _force_background
from tests.train.test_trainer import make_trainer


@pytest.mark.parametrize("recipe,classes,hinted", [("samed", (1, 2), True), ("cheap-lunch", (1,), False)])
def test_a_prompt_free_run_that_finds_nothing_says_why_it_may_not_be_learnable(tmp_path, recipe, classes, hinted):
    trainer = make_trainer(tmp_path, recipe, classes, **{"train.steps": 1})
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    trainer.history = [{"step": 1, "loss": 0.9, "val_dice": 0.0}, {"step": 2, "loss": 0.8, "val_dice": 0.0}]
    _force_background(trainer)
    found = collapse_warnings(trainer)
    assert len(found) == 2  # validation at 0 and background on its own slices: both carry the hint, or neither
    assert all((SEMANTIC_HINT in w) == hinted for w in found)
    assert json.loads((tmp_path / "warnings.json").read_text())["warnings"] == found
