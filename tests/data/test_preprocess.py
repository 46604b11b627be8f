"""Intensity presets on hand-computed values."""

import numpy as np
import pytest

from samadapt.data.preprocess import PRESETS, ct_window, minmax, normalize, percentile_clip, preset_for_modality


def test_ct_windows():
    hu = np.array([-1000.0, -125.0, 75.0, 275.0, 1000.0])
    np.testing.assert_allclose(normalize(hu, "ct_synapse"), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(normalize(hu, "ct_abdomen"), [0, 35 / 400, 235 / 400, 1, 1])  # [-160, 240]
    np.testing.assert_allclose(ct_window(hu, level=40, width=400), normalize(hu, "ct_abdomen"))
    np.testing.assert_allclose(normalize(np.array([-1350.0, -600.0, 150.0]), "ct_lung"), [0, 0.5, 1])
    assert normalize(hu.astype(np.int16), "ct_synapse").dtype == np.float32
    with pytest.raises(ValueError, match="high > low"):
        ct_window(hu, 0, 0)


def test_mr_percentiles_are_taken_over_the_whole_volume():
    values = np.arange(1001, dtype=float)
    clipped = percentile_clip(values)  # 0.5 / 99.5 percentiles: 5 and 995
    assert clipped[0] == 0 and clipped[5] == 0 and clipped[995] == 1 and clipped[-1] == 1
    assert clipped[500] == pytest.approx(0.5)
    volume = np.stack([np.full((4, 4), 10.0), np.full((4, 4), 20.0)])  # two constant slices
    out = normalize(volume, "mr")
    assert out[0].max() == 0 and out[1].min() == 1  # per volume: the slices keep their order
    assert normalize(volume[1], "percentile_slice").max() == 0  # per slice: a constant slice is all zeros


def test_constant_images_nans_and_rgb():
    for preset in PRESETS:
        out = normalize(np.full((3, 4, 4), 7.0), preset)
        assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(minmax(np.full((4, 4), 7.0)), 0)
    with_nan = np.array([0.0, np.nan, 10.0])
    np.testing.assert_allclose(normalize(with_nan, "minmax"), [0, 0, 1])
    rgb = np.array([[[0, 51, 255]]], np.uint8)
    np.testing.assert_allclose(normalize(rgb, "rgb"), [[[0, 0.2, 1]]])
    np.testing.assert_allclose(normalize(np.array([100, 300], np.uint16), "rgb"), [0, 1])  # not 8-bit: min-max
    with pytest.raises(ValueError, match="unknown preprocessing preset"):
        normalize(rgb, "zscore")


@pytest.mark.parametrize(
    "modality,preset",
    [("CT", "ct_abdomen"), ("ct", "ct_abdomen"), ("MRI", "mr"), ("FLAIR", "mr"), ("T2", "mr"), ("US", "mr")]
    + [("rgb_to_0_1", "rgb"), ("rescale_to_0_1", "minmax"), ("Dermoscopy", "rgb")],
)
def test_preset_from_modality(modality, preset):
    assert preset_for_modality(modality) == preset
