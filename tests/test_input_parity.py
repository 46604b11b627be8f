"""One model-input path: the tensor training feeds the encoder for a slice is, bit for bit, the tensor that
validation, evaluation (slices and whole volumes) and volume prediction feed it, for every preprocessing preset."""

import json

import numpy as np
import pytest
import torch

from samadapt.data.datasets import SliceDataset, load_dataset
from samadapt.data.io import read_volume
from samadapt.data.preprocess import PRESETS
from samadapt.eval.evaluate import evaluate_slices, evaluate_volumes
from samadapt.predict import Predictor, predict_folder, predict_volume
from samadapt.runs import Manifest, Run
from samadapt.train.config import TrainConfig, apply_overrides, from_dict
from samadapt.train.recipes import recipe_defaults
from samadapt.train.samples import prepare_slices
from samadapt.train.trainer import Trainer
from samadapt.transforms import model_input
from tests.conftest import make_tiny_sam
from tests.data.conftest import write_nifti

SIZE = 64


def ct_like_dataset(root, preset: str, axis: int):
    """Two volumes with HU-like intensities (not in [0, 1]) and a box lesion, and the preset named in dataset.json."""
    rng = np.random.default_rng(1)
    training = []
    for i in range(2):
        image = rng.normal(40, 300, size=(20, 18, 6)).astype(np.float32)
        if preset == "rgb":
            image = rng.integers(0, 256, size=(20, 18, 6)).astype(np.uint8)
        label = np.zeros(image.shape, np.uint8)
        label[5:12, 4:10, 1:5] = 1
        write_nifti(root / "imagesTr" / f"case{i}.nii.gz", image)
        write_nifti(root / "labelsTr" / f"case{i}.nii.gz", label)
        training.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    meta = {
        "labels": {"0": "background", "1": "lesion"},
        "modality": {"0": "CT"},
        "training": training,
        "samadapt": {"preprocessing": preset, "axis": axis},
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


class EncoderInputs:
    """Records every tensor the image encoder receives (on the CPU), leaving the model's behaviour unchanged."""

    def __init__(self, model):
        self.seen: list[torch.Tensor] = []
        self._encode = model.encode_image
        model.encode_image = self

    def __call__(self, images):
        self.seen.append(images.detach().cpu().clone())
        return self._encode(images)


def training_input(item: dict, tmp_path) -> torch.Tensor:
    """What a real training step feeds the encoder for this slice (augmentation off, one slice per batch)."""
    overrides = ["train.steps=1", "train.batch_size=1", "data.augment=false", "train.precision=fp32"]
    config = from_dict(TrainConfig, apply_overrides(recipe_defaults("cheap-lunch"), overrides))
    from samadapt.peft import apply_peft

    model = apply_peft(make_tiny_sam(SIZE), config.peft)
    manifest = Manifest(base_model="tiny", base_sha256="0" * 64, peft=config.peft.to_dict())
    trainer = Trainer(config, model, prepare_slices([item], SIZE), [], [1], tmp_path / "run", manifest)
    inputs = EncoderInputs(model)
    trainer.train_step()
    assert len(inputs.seen) == 1
    return inputs.seen[0]


@pytest.mark.parametrize("preset", PRESETS)
def test_training_evaluation_and_prediction_feed_the_same_tensor(tmp_path, preset):
    axis = 2
    spec = load_dataset(ct_like_dataset(tmp_path / "data", preset, axis))
    slices = SliceDataset(spec)
    index = slices.indices([1])[1]
    case_id, z, _ = slices.slices[index]
    item = slices[index]
    trained = training_input(item, tmp_path)

    model = make_tiny_sam(SIZE)
    facts = Manifest("tiny", "0" * 64, {}, preprocessing=preset, axis=axis, precision="fp32")
    run = Run(model, "tiny", "prompt", {1: "lesion"}, facts)
    inputs = EncoderInputs(model)
    evaluate_slices(run, [item], {1: "lesion"}, "point:1", progress=False)
    evaluate_volumes(run, slices, [case_id], {1: "lesion"}, "box", progress=False)
    at_z = [k for k, p in enumerate([slices.slices[i][1] for i in slices.indices([1], [case_id])]) if p == z][0]
    volume = read_volume(spec.case(case_id).image)
    # slicing axis 2 of the (Z, Y, X) array is x: a voxel box (x0, y0, z0, x1, y1, z1) flat in x = z of the slice
    voxel_box = [[z, 4, 1, z, 9, 4]]
    predict_volume(run, volume, boxes=np.array(voxel_box, np.float32))
    by_evaluation, by_volume, by_prediction = inputs.seen[0], inputs.seen[1 + at_z], inputs.seen[-1]
    for other in (by_evaluation, by_volume, by_prediction):
        assert other.dtype == trained.dtype == torch.float32
        assert torch.equal(other, trained), preset


def test_a_preprocessed_slice_is_never_rescaled_but_a_raw_image_is():
    model = make_tiny_sam(SIZE)
    inputs = EncoderInputs(model)
    predictor = Predictor(model, device="cpu")
    dim = np.full((20, 20), 0.25, np.float32)
    dim[5:10, 5:10] = 0.5  # a preprocessed slice spanning [0.25, 0.5]: must stay so, not be stretched to [0, 1]
    predictor.set_image(dim, preprocessed=True)
    predictor.set_image(dim)  # raw: the documented rule (min-max for floats) stretches it
    as_is, raw = inputs.seen
    assert torch.equal(as_is, model_input(dim, SIZE)[0])
    assert as_is[..., :SIZE, :SIZE].max().item() == pytest.approx(0.5)
    assert raw.max().item() == pytest.approx(1.0)


def test_a_slice_outside_the_unit_range_is_refused_with_its_range():
    with pytest.raises(ValueError, match=r"\[0, 1\].*-100"):
        model_input(np.array([[-100.0, 200.0]], np.float32), SIZE)


def test_training_evaluation_and_prediction_feed_the_same_slice_position(tmp_path):
    """model.slice_position: the position training feeds the decoder for a slice is the one validation, evaluation
    (slices and whole volumes) and volume prediction feed it; predict_volume gives slice z of D the position
    z / (D - 1) (``data.position``)."""
    from samadapt.data.position import slice_position
    from samadapt.models.mask_decoder import make_semantic_decoder
    from samadapt.peft import apply_peft

    axis = 2
    spec = load_dataset(ct_like_dataset(tmp_path / "data", "ct_abdomen", axis))
    slices = SliceDataset(spec)
    index = slices.indices([1])[1]
    case_id, z, _ = slices.slices[index]
    item = slices[index]
    depth = slices.depths[case_id]
    assert depth > 2 and 0 < z < depth - 1 and item["position"] == slice_position(z, depth) == z / (depth - 1)

    overrides = ["train.steps=1", "train.batch_size=1", "data.augment=true", "model.slice_position=true"]
    config = from_dict(TrainConfig, apply_overrides(recipe_defaults("samed"), overrides))
    model = make_tiny_sam(SIZE)
    make_semantic_decoder(model.mask_decoder, 1, slice_position=True)
    apply_peft(model, config.peft)
    seen: list[float] = []
    model.mask_decoder.slice_prior.register_forward_hook(lambda module, args, out: seen.extend(args[0].tolist()))
    manifest = Manifest(base_model="tiny", base_sha256="0" * 64, peft=config.peft.to_dict(), task="semantic")
    trainer = Trainer(config, model, prepare_slices([item], SIZE), [item], [1], tmp_path / "run", manifest)
    trainer.train_step()  # augmented: the position stays the slice's
    trained = list(seen)
    assert trained == [pytest.approx(z / (depth - 1))]
    trainer.validate()
    assert seen[1:] == trained
    seen.clear()

    facts = Manifest("tiny", "0" * 64, {}, task="semantic", preprocessing="ct_abdomen", axis=axis, precision="fp32")
    run = Run(model.eval(), "tiny", "semantic", {1: "lesion"}, facts)
    evaluate_slices(run, [item], {1: "lesion"}, "none", progress=False)
    assert seen == trained
    seen.clear()
    evaluate_volumes(run, slices, [case_id], {1: "lesion"}, "none", progress=False)
    assert seen == pytest.approx([k / (depth - 1) for k in range(depth)]) and seen[z] == trained[0]
    seen.clear()
    predict_volume(run, read_volume(spec.case(case_id).image), batch_size=4)
    assert seen == pytest.approx([k / (depth - 1) for k in range(depth)]) and seen[z] == trained[0]
    seen.clear()
    predict_folder(run, spec.root / "imagesTr", tmp_path / "predictions", progress=False)  # every case, its own depth
    expected = [k / (d - 1) for d in slices.depths.values() for k in range(d)]
    assert sorted(seen) == pytest.approx(sorted(expected))
