"""Anomaly maps: per-level distances, level combination, blur and resizing."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from gaussad.gaussian import mahalanobis
from gaussad.maps import blur_last_axis, combine_maps, level_distance_map, resize_map


def combine_levels(level_maps: list[torch.Tensor], size: tuple[int, int], blur_sigma: float) -> torch.Tensor:
    return combine_maps(level_maps, None, size, blur_sigma)


def test_blur_matches_scipy() -> None:
    values = torch.rand(3, 50, dtype=torch.float64)
    # scipy's 'mirror' mode is torch's 'reflect' padding; truncate=4 sigma as ours.
    expected = gaussian_filter1d(values.numpy(), 3.0, axis=-1, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(blur_last_axis(values, 3.0).numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("blur_sigma", [0.0, 2.0])
@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_combined_map_is_the_mean_of_upsampled_levels_blurred(
    blur_sigma: float, size: tuple[int, int]
) -> None:
    level_maps = [torch.rand(2, 7, 5, dtype=torch.float64), torch.rand(2, 4, 3, dtype=torch.float64)]
    upsampled = [
        F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] for m in level_maps
    ]
    expected = (sum(upsampled) / 2).numpy()
    if blur_sigma:
        expected = gaussian_filter(expected, blur_sigma, axes=(1, 2), mode="mirror", truncate=4.0)
    combined = combine_levels(level_maps, size, blur_sigma)
    assert combined.dtype == torch.float64
    np.testing.assert_allclose(combined.numpy(), expected, atol=1e-12)


def test_level_maps_shared_and_per_position_agree_with_direct_distances() -> None:
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(2, 3, 4, 5)))
    mean, whitening = torch.from_numpy(rng.normal(size=3)), torch.from_numpy(rng.normal(size=(3, 2)))
    shared = level_distance_map(features, mean, whitening)
    assert shared.shape == (2, 4, 5)
    torch.testing.assert_close(shared[1, 2, 3], mahalanobis(features[1, :, 2, 3], mean, whitening))

    means = torch.from_numpy(rng.normal(size=(20, 3)))
    whitenings = torch.from_numpy(rng.normal(size=(20, 3, 2)))
    local = level_distance_map(features, means, whitenings)
    position = 2 * 5 + 3  # row-major (h, w) -> flat position
    expected = mahalanobis(features[1, :, 2, 3], means[position], whitenings[position])
    torch.testing.assert_close(local[1, 2, 3], expected)


def test_combine_averages_upsampled_levels_and_resize_keeps_constants() -> None:
    coarse = torch.full((1, 2, 2), 4.0)
    fine = torch.full((1, 8, 8), 2.0)
    combined = combine_levels([coarse, fine], (16, 16), blur_sigma=0)
    assert combined.shape == (1, 16, 16)
    torch.testing.assert_close(combined, torch.full((1, 16, 16), 3.0))
    assert resize_map(combined[0], (30, 20)).shape == (30, 20)
    blurred = combine_levels([coarse], (16, 16), blur_sigma=2.0)
    torch.testing.assert_close(blurred, torch.full((1, 16, 16), 4.0))
