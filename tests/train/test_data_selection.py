"""What ``train`` hands the trainer: exactly the exemplars asked for, all from training cases, and synthesis
backgrounds that never come from a validation case."""

import numpy as np
import pytest

import samadapt.data.synthesis as synthesis
import samadapt.train.api as api
from samadapt.data.datasets import SliceDataset, load_dataset
from samadapt.data.selection import split_cases
from samadapt.train.config import TrainConfig, apply_overrides, from_dict
from samadapt.train.recipes import recipe_defaults
from tests.data.test_synthesis import tiny_msd  # noqa: F401  (fixture)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exemplar_count_is_exact_and_nothing_comes_from_validation_cases(tiny_msd, monkeypatch, seed):  # noqa: F811
    calls = {}
    real_backgrounds = synthesis.background_slices

    def fit_slices(config, train_items, val_items, classes, run_dir, preprocessing="", resume=False, **options):
        calls["train"], calls["val"], calls["synthetic"] = train_items, val_items, options.get("synthetic_items", [])

    def background_slices(slices, classes, *args, **kwargs):
        calls["backgrounds"] = real_backgrounds(slices, classes, *args, **kwargs)
        calls["slices"] = slices
        return calls["backgrounds"]

    monkeypatch.setattr(api, "fit_slices", fit_slices)
    monkeypatch.setattr(synthesis, "background_slices", background_slices)
    overrides = [
        f"data.path={tiny_msd}",
        "data.exemplars=4",
        "data.val_cases=1",
        "data.synthesize_on_the_fly=true",
        "data.synthetic_size=6",
        f"train.seed={seed}",
    ]
    config = from_dict(TrainConfig, apply_overrides(recipe_defaults("cheap-lunch"), overrides))
    api.train(config, "unused")
    spec = load_dataset(tiny_msd)
    train_cases, val_cases = split_cases(spec, 1, seed)
    real = list(calls["train"])
    assert not any("exemplar" in item for item in real)  # synthetic items (they name their exemplar) go apart
    labelled = [item for item in real if np.isin(item["label"], [1, 2]).any()]
    assert len(labelled) == 4
    assert {item["case"] for item in real} <= set(train_cases)
    assert {calls["slices"].slices[i][0] for i in calls["backgrounds"]} <= set(train_cases)
    assert {item["case"] for item in calls["val"]} <= set(val_cases)
    assert len(calls["synthetic"]) == 6 and all("exemplar" in item for item in calls["synthetic"])


def test_slice_index_queries_scale_linearly(tiny_msd):  # noqa: F811
    slices = SliceDataset(load_dataset(tiny_msd))
    many_cases = [f"case{k}" for k in range(20000)] + ["a"]  # a long case list must not be scanned per slice
    assert slices.indices([1], many_cases) == slices.indices([1], ["a"])
