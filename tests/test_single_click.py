"""One click alone: the Predictor decodes SAM's three candidates and keeps the one its IoU head rates best (real
LiteMedSAM weights, real lesion slices); evaluate scores exactly the masks the Predictor gives for the same prompt."""

import numpy as np
import pytest
import torch

from samadapt.data.datasets import SliceDataset, load_dataset
from samadapt.eval.evaluate import evaluate_slices
from samadapt.eval.metrics import dice
from samadapt.predict import Predictor, best_candidate, is_single_click
from samadapt.prompts import box_from_mask, centre_click
from samadapt.runs import load_run


@pytest.fixture(scope="module")
def lesion_items(demo_data):
    slices = SliceDataset(load_dataset(demo_data["lesions"]))
    labelled = slices.indices([1])
    return [slices[i] for i in labelled[:: max(1, len(labelled) // 4)][:4]]


@pytest.fixture(scope="module")
def run():
    return load_run("lite_medsam", device="cpu")


def test_is_single_click():
    assert is_single_click(np.array([1]), None, None)
    assert is_single_click(np.array([[1], [1]]), None, None)  # several prompt sets of one click each
    assert not is_single_click(np.array([1, 0]), None, None)
    assert not is_single_click(np.array([1]), np.array([0, 0, 9, 9]), None)
    assert not is_single_click(np.array([1]), None, np.zeros((1, 64, 64)))
    assert not is_single_click(None, np.array([0, 0, 9, 9]), None)


@pytest.mark.parametrize("as_torch", [False, True])
def test_best_candidate_takes_the_highest_predicted_iou_per_prompt_set(as_torch):
    logits = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    scores = np.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]], np.float32)
    if as_torch:
        logits, scores = torch.from_numpy(logits), torch.from_numpy(scores)
    best_logits, best_scores = best_candidate(logits, scores)
    assert tuple(best_logits.shape) == (2, 1, 2, 2) and tuple(best_scores.shape) == (2, 1)
    assert np.array_equal(np.asarray(best_logits[0, 0]), np.asarray(logits[0, 1]))
    assert np.array_equal(np.asarray(best_logits[1, 0]), np.asarray(logits[1, 0]))
    assert np.allclose(np.asarray(best_scores)[:, 0], [0.9, 0.7])


@pytest.mark.slow
def test_one_click_returns_the_candidate_the_iou_head_rates_best(run, lesion_items):
    predictor = Predictor(run.model, device="cpu", precision=run.precision)
    differed = 0
    for item in lesion_items:
        predictor.set_image(item["image"], preprocessed=True)
        click = centre_click(item["label"] == 1)
        prompt = dict(points=np.array([[click.x, click.y]]), labels=np.array([1]))
        chosen = predictor.predict(**prompt)
        candidates = predictor.predict(**prompt, multimask_output=True)
        best = int(np.argmax(candidates.scores[0]))
        assert chosen.masks.shape == (1, 1, *item["label"].shape)
        assert np.array_equal(chosen.masks[0, 0], candidates.masks[0, best])
        assert chosen.scores[0, 0] == pytest.approx(candidates.scores[0].max())
        assert torch.equal(chosen.low_res_logits[0, 0], candidates.low_res_logits[0, best])
        single = predictor.predict(**prompt, multimask_output=False)
        differed += not np.array_equal(single.masks[0, 0], chosen.masks[0, 0])
        # a second click disambiguates: the single-mask output, as SAM does
        two = dict(points=np.array([[click.x, click.y], [0, 0]]), labels=np.array([1, 0]))
        assert np.array_equal(predictor.predict(**two).masks, predictor.predict(**two, multimask_output=False).masks)
    assert differed  # the selection changes the answer on real slices: the test can tell the two apart


def test_the_switch_turns_the_selection_off(run, lesion_items):
    item = lesion_items[0]
    click = centre_click(item["label"] == 1)
    prompt = dict(points=np.array([[click.x, click.y]]), labels=np.array([1]))
    predictor = Predictor(run.model, device="cpu", precision=run.precision, select_single_click=False)
    predictor.set_image(item["image"], preprocessed=True)
    assert np.array_equal(predictor.predict(**prompt).masks, predictor.predict(**prompt, multimask_output=False).masks)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["point:1", "box"])
def test_evaluate_scores_the_masks_the_predictor_gives(run, lesion_items, protocol):
    evaluation = evaluate_slices(run, lesion_items, {1: "lesion"}, protocol, progress=False)
    scored = {(row["case"], row["slice"]): row["dice"] for row in evaluation.rows}
    predictor = Predictor(run.model, device="cpu", precision=run.precision)
    for item in lesion_items:
        predictor.set_image(item["image"], preprocessed=True)
        target = item["label"] == 1
        if protocol == "box":
            mask = predictor.predict(boxes=box_from_mask(target)).masks[0, 0]
        else:
            click = centre_click(target)
            mask = predictor.predict(points=np.array([[click.x, click.y]]), labels=np.array([1])).masks[0, 0]
        assert scored[(item["case"], item["slice"])] == pytest.approx(dice(mask, target), abs=1e-9)
