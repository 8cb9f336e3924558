"""Model inputs (decoded, squashed to a square) and image descriptors (feature maps pooled globally or per
cell of a grid)."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from gaussad.features import pool_features, prepare, stack_levels


@pytest.mark.parametrize("shape", [(300, 200, 3), (50, 70, 3), (64, 64, 3)], ids=["down", "up", "same"])
def test_inputs_are_squashed_as_pillow_bilinear_does(shape: tuple[int, int, int]) -> None:
    original = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    original.setflags(write=False)  # as PIL's arrays are: no warning, no write
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels, size = prepare(original, 64)
    expected = np.asarray(Image.fromarray(original).resize((64, 64), Image.Resampling.BILINEAR))
    assert size == shape[:2] and pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - expected).max() <= 1  # rounding only


def test_grid_pooling_averages_each_cell_and_keeps_channels_together() -> None:
    features = torch.arange(2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4)
    torch.testing.assert_close(pool_features(features, 1), features.mean(dim=(2, 3)))
    pooled = pool_features(features, 2)
    assert pooled.shape == (2, 3 * 2 * 2)
    # Channel-major: channel c's four cells (top-left, top-right, bottom-left, bottom-right) are adjacent.
    top_left = features[:, :, :2, :2].mean(dim=(2, 3))
    bottom_right = features[:, :, 2:, 2:].mean(dim=(2, 3))
    torch.testing.assert_close(pooled.view(2, 3, 4)[:, :, 0], top_left)
    torch.testing.assert_close(pooled.view(2, 3, 4)[:, :, 3], bottom_right)


def test_grid_pooling_covers_maps_that_do_not_divide_evenly() -> None:
    features = torch.rand(1, 2, 7, 7, dtype=torch.float64)
    pooled = pool_features(features, 4).view(1, 2, 4, 4)
    # Cells overlap where 7 does not divide by 4, yet the corners stay corners.
    torch.testing.assert_close(pooled[0, :, 0, 0], features[0, :, :2, :2].mean(dim=(1, 2)))
    torch.testing.assert_close(pooled[0, :, 3, 3], features[0, :, 5:, 5:].mean(dim=(1, 2)))


def test_stacked_levels_sit_on_the_coarsest_grid() -> None:
    fine = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    coarse = torch.rand(2, 5, 4, 4, dtype=torch.float64)
    stacked = stack_levels([fine, coarse])
    assert stacked.shape == (2, 8, 4, 4)
    torch.testing.assert_close(stacked[:, :3, 1, 2], fine[:, :, 2:4, 4:6].mean(dim=(2, 3)))
    torch.testing.assert_close(stacked[:, 3:], coarse)
