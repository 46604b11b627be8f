"""Training augmentation: image and label stay aligned, the result is reproducible from the generator."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from samadapt.train.augment import AugmentConfig, augment

GEOMETRY_ONLY = AugmentConfig(p_affine=1.0, p_scale=0, p_shift=0, p_gamma=0, p_noise=0)
INTENSITY_ONLY = AugmentConfig(p_affine=0, p_scale=1, p_shift=1, p_gamma=1, p_noise=1)


def _slice(size=64):
    """An image whose intensity encodes the label: class 1 an off-centre rectangle, class 2 a small square."""
    label = np.zeros((size, size), np.int64)
    label[10:30, 14:44] = 1
    label[40:50, 40:50] = 2
    image = torch.from_numpy(np.where(label > 0, 0.3 * label + 0.1, 0.0).astype(np.float32))[None].repeat(3, 1, 1)
    return image, label


@pytest.mark.parametrize("seed", range(6))
def test_affine_keeps_image_and_label_aligned(seed):
    image, label = _slice()
    out_image, out_label = augment(image, label, np.random.default_rng(seed), GEOMETRY_ONLY)
    assert out_image.shape == image.shape and out_label.shape == label.shape and out_label.dtype == np.int64
    assert type(out_image) is torch.Tensor  # not MONAI's MetaTensor: the model's ops need a plain tensor
    assert not np.array_equal(out_label, label)  # it did move
    assert set(np.unique(out_label)) <= {0, 1, 2}
    decoded = np.rint((out_image[0].numpy() - 0.1) / 0.3).clip(0, 2).astype(np.int64)
    for class_id in (1, 2):
        inner = ndimage.binary_erosion(out_label == class_id)  # away from the interpolated border
        assert inner.sum() > 20 and (decoded[inner] == class_id).all()
    # the image's mass of a structure is centred where its moved label is: no half-pixel shift between them
    mask_image = torch.from_numpy((label == 1).astype(np.float32))[None].repeat(3, 1, 1)
    moved_image, moved_label = augment(mask_image, label, np.random.default_rng(seed), GEOMETRY_ONLY)
    weight = moved_image[0].numpy()
    yy, xx = np.mgrid[: label.shape[0], : label.shape[1]]
    ys, xs = np.nonzero(moved_label == 1)
    assert abs((weight * yy).sum() / weight.sum() - ys.mean()) < 0.25
    assert abs((weight * xx).sum() / weight.sum() - xs.mean()) < 0.25
    assert abs(weight.sum() - len(ys)) < 0.03 * len(ys)


def test_intensity_changes_leave_the_label_and_padding_alone():
    image, label = _slice()
    out_image, out_label = augment(image, label, np.random.default_rng(0), INTENSITY_ONLY)
    assert np.array_equal(out_label, label)
    assert torch.all(out_image[:, label == 0] == 0)  # zero padding stays zero
    assert not torch.allclose(out_image, image) and out_image.min() >= 0 and out_image.max() <= 1
    # brighter structures stay brighter on average (a monotone change plus small noise)
    assert out_image[0][label == 2].mean() > out_image[0][label == 1].mean()


def test_same_generator_state_same_result_and_inputs_untouched():
    image, label = _slice()
    copy_image, copy_label = image.clone(), label.copy()
    first = augment(image, label, np.random.default_rng(7))
    second = augment(image, label, np.random.default_rng(7))
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert torch.equal(image, copy_image) and np.array_equal(label, copy_label)
    results = [augment(image, label, np.random.default_rng(s))[0] for s in range(8)]
    assert len({r.sum().item() for r in results}) > 4  # different seeds, different slices


def test_mismatched_grids_are_refused():
    image, label = _slice()
    with pytest.raises(ValueError, match="one grid"):
        augment(image, label[:32], np.random.default_rng(0))
