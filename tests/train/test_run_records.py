"""What ``train`` writes for later use: the manifest's trained outputs (how one click is answered) and
exemplars.json (the labelled slices the run learnt from), on the tiny MSD set with LiteMedSAM, one step."""

import json

import pytest

from samadapt.data.datasets import SliceDataset, load_dataset
from samadapt.data.selection import split_cases
from samadapt.data.synthesis import select_exemplars
from samadapt.runs import RunLayout, load_run
from samadapt.selection import one_click_best
from samadapt.train.api import train
from samadapt.train.config import TrainConfig, apply_overrides, from_dict
from samadapt.train.exemplars import exemplar_record, read_exemplars
from samadapt.train.recipes import recipe_defaults
from tests.data.test_synthesis import tiny_msd  # noqa: F401  (fixture)


@pytest.mark.slow
@pytest.mark.parametrize("multimask", [False, True])
def test_train_records_its_outputs_and_its_exemplars(tiny_msd, tmp_path, multimask):  # noqa: F811
    overrides = [
        f"data.path={tiny_msd}",
        "data.exemplars=3",
        "data.val_cases=1",
        "data.workers=0",
        "train.steps=1",
        "train.batch_size=1",
        "train.val_every=0",
        "train.precision=fp32",
        f"prompt.multimask={str(multimask).lower()}",
    ]
    config = from_dict(TrainConfig, apply_overrides(recipe_defaults("cheap-lunch"), overrides))
    train(config, tmp_path)
    manifest = json.loads((RunLayout(tmp_path).checkpoint("best") / "adapter_config.json").read_text())
    masks = "multimask" if multimask else "single"
    assert manifest["schema_version"] == 2 and manifest["prompt"]["multimask"] is multimask
    assert manifest["outputs"] == {"masks": masks, "iou_head": True}  # cheap-lunch trains its IoU head
    assert one_click_best(load_run(tmp_path, device="cpu").manifest.to_dict(), "trained") is multimask

    slices = SliceDataset(load_dataset(tiny_msd))
    train_cases, _ = split_cases(load_dataset(tiny_msd), 1, 0)
    chosen = select_exemplars(slices, 3, [1, 2], seed=0, cases=train_cases)
    record = json.loads(RunLayout(tmp_path).exemplars.read_text())
    assert sorted(read_exemplars(tmp_path)) == sorted(slices.slices[i][:2] for i in chosen)
    assert len(record["labelled"]) == 3 and {e["case"] for e in record["labelled"]} <= set(train_cases)
    assert record["classes"] == [1, 2] and record["axis"] == 0 and record["synthetic"] == 0
    assert record["target_free"] and all(e["case"] in train_cases for e in record["target_free"])


def test_the_record_separates_labelled_target_free_and_synthetic_slices():
    from samadapt.data.datasets import SliceInfo

    infos = [SliceInfo("a", 4, (1,)), SliceInfo("a", 9, ()), SliceInfo("b", 2, (2, 3)), SliceInfo("synth", 0, (1,))]
    record = exemplar_record(infos, [1, 2], synthetic=1, axis=2, dataset="/d")
    assert record == {
        "axis": 2,
        "dataset": "/d",
        "classes": [1, 2],
        "labelled": [{"case": "a", "slice": 4, "classes": [1]}, {"case": "b", "slice": 2, "classes": [2]}],
        "target_free": [{"case": "a", "slice": 9}],
        "synthetic": 1,
    }
    assert read_exemplars("/nonexistent-run") == []
