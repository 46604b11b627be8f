"""The many-small-classes task: MNI152 grey matter split into 8 regions."""

import numpy as np
import pytest

from samadapt.data import SliceDataset, load_dataset
from samadapt.data.demo import REGION_NAMES, fetch_regions, grey_matter_regions


def test_octants_follow_world_axes_and_keep_other_tissue_out():
    tissue = np.ones((4, 4, 5), np.uint8)  # (Z, Y, X): grey matter, and a column of white matter at x = 4
    tissue[:, :, 4] = 2
    regions = grey_matter_regions(tissue, np.eye(4))
    assert not regions[:, :, 4].any()
    # index [z, y, x]: x > median -> right (+1), y -> anterior (+2), z -> superior (+4)
    assert regions[0, 0, 3] == 2 and regions[0, 3, 0] == 3 and regions[3, 0, 0] == 5 and regions[3, 3, 3] == 8
    counts = np.bincount(regions.ravel(), minlength=9)
    assert counts[0] == 16 and set(counts[1:]) == {8}
    assert set(REGION_NAMES) == set(range(1, 9))
    assert REGION_NAMES[2].startswith("right posterior inferior")


def test_a_flipped_affine_swaps_the_hemispheres():
    tissue = np.ones((2, 2, 2), np.uint8)
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])  # voxel x grows towards the left
    assert grey_matter_regions(tissue, flipped)[0, 0, 0] == 2
    assert grey_matter_regions(tissue, np.eye(4))[0, 0, 0] == 1
    assert not grey_matter_regions(np.full((2, 2, 2), 2), np.eye(4)).any()
    with pytest.raises(ValueError, match="Z, Y, X"):
        grey_matter_regions(np.ones((2, 2)), np.eye(4))


@pytest.mark.slow
def test_real_regions_dataset_is_balanced(demo_data):
    root = fetch_regions(demo_data["mni152"].parent)
    spec = load_dataset(root)
    assert spec.classes == REGION_NAMES
    slices = SliceDataset(spec)
    _, label = slices.read_case("mni152")
    _, tissue = SliceDataset(load_dataset(demo_data["mni152"])).read_case("mni152")
    counts = np.bincount(label.array.ravel(), minlength=9)[1:]
    assert counts.min() > 0.7 * counts.max()
    assert np.array_equal(label.array > 0, tissue.array == 1)  # exactly the grey matter
    # the left hemisphere has the lower world x (RAS), i.e. the lower voxel x on this template
    assert np.nonzero(label.array == 1)[2].mean() < np.nonzero(label.array == 2)[2].mean()
