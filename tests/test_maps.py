"""Anomaly maps: per-level distances, level combination, blur and resizing."""

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torchvision.transforms.functional import gaussian_blur as torchvision_blur

from gaussad.gaussian import mahalanobis
from gaussad.maps import combine_levels, gaussian_blur, level_distance_map, resize_map


def test_blur_matches_scipy_and_torchvision() -> None:
    maps = torch.rand(2, 1, 40, 50, dtype=torch.float64)
    ours = gaussian_blur(maps, 3.0)
    # scipy's 'mirror' mode is torch's 'reflect' padding; truncate=4 sigma as ours.
    expected = np.stack([gaussian_filter(m[0].numpy(), 3.0, mode="mirror", truncate=4.0) for m in maps])
    np.testing.assert_allclose(ours[:, 0].numpy(), expected, atol=1e-12)
    torch.testing.assert_close(ours, torchvision_blur(maps, kernel_size=[25, 25], sigma=[3.0, 3.0]))


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
    combined = combine_levels([coarse, fine], 16, blur_sigma=0)
    assert combined.shape == (1, 16, 16)
    torch.testing.assert_close(combined, torch.full((1, 16, 16), 3.0))
    assert resize_map(combined[0], (30, 20)).shape == (30, 20)
    torch.testing.assert_close(combine_levels([coarse], 16, blur_sigma=2.0), torch.full((1, 16, 16), 4.0))
