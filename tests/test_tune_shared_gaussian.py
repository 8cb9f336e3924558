"""The shared-map variants of `benchmarks/tune_shared_gaussian.py`: its one Gaussian is the model's shared
map, a mixture measures each patch by its nearest cluster, and neighbourhood features are 3 x 3 means."""

import numpy as np
import pytest
import torch
from conftest import benchmark_script, fit_small

from gaussad.analysis import level_results
from gaussad.gaussian import fit_gaussian
from gaussad.layout import list_test_images, training_images

tune = benchmark_script("tune_shared_gaussian")


def test_one_gaussian_gives_the_models_own_level_distances(category) -> None:
    # A hybrid model with one Gaussian per level in its shared half, as the script's baseline.
    tiny = fit_small(training_images(category)[:8], localization="hybrid", mixture_clusters=1)
    tests = [item.path for item in list_test_images(category)][:6]
    train_levels, _ = tune.level_features(tiny, training_images(category)[:8])
    test_levels, position_maps = tune.level_features(tiny, tests, with_positions=True)
    results = level_results(tiny, tests)
    model_maps = results.level_maps
    torch.testing.assert_close(position_maps, results.position_maps)  # the model's own position maps
    one = tune.variants()[tune.BASELINE]
    assert len(train_levels) == len(model_maps) == len(tiny.state_.map_gaussian_levels)
    for train, test, model_map in zip(train_levels, test_levels, model_maps, strict=True):
        distances = one(train, test).reshape(model_map.shape)
        np.testing.assert_allclose(distances, model_map.numpy(), rtol=1e-5)  # float64 against float32


def test_a_mixture_measures_a_patch_by_its_nearest_cluster() -> None:
    rng = np.random.default_rng(0)
    centres = np.zeros((2, 6))
    centres[1, 0] = 40.0
    train = np.concatenate([centre + rng.normal(size=(2000, 6)) for centre in centres])
    between = np.full((1, 6), 0.0)
    between[0, 0] = 20.0  # halfway: normal to one Gaussian spanning both clusters, far from either
    test = np.concatenate([centres, between])
    one = fit_gaussian(train, "none", 1.0)
    mixture = tune.mixture_distances(train, test, 2, one)
    single = one.component_distances(test) * np.sqrt(one.n_components)
    assert mixture[:2].max() < 1.0  # each cluster's centre is typical of its own cluster
    assert mixture[2] > 10 * single[2]


def test_neighbourhood_features_are_3_by_3_means_inside_the_map() -> None:
    features = torch.zeros(1, 1, 5, 5)
    features[0, 0, 2, 2] = 9.0
    features[0, 0, 0, 0] = 4.0
    averaged = tune.neighbourhood(features)[0, 0]
    assert averaged[1:4, 1:4].min() >= 1.0  # the centre's 9 over each neighbourhood of nine
    assert float(averaged[1, 1]) == pytest.approx(13.0 / 9.0)  # also sees the corner
    assert float(averaged[0, 0]) == pytest.approx(4.0 / 4.0)  # the corner: over the four positions inside
    assert averaged[4, 4] == 0.0
    constant = torch.full((2, 3, 4, 4), 2.5)
    torch.testing.assert_close(tune.neighbourhood(constant), constant)


def test_the_proxy_table_chooses_as_the_auto_localization() -> None:
    mixed = f"hybrid, mixture {tune.PROXY_MIXTURE}"
    results = {
        "close": {"proxy": {"shared, one Gaussian": 0.900, "hybrid, one Gaussian": 0.901, mixed: 0.903}},
        "apart": {"proxy": {"shared, one Gaussian": 0.500, "hybrid, one Gaussian": 0.700, mixed: 0.490}},
    }
    rows = {
        line.split(" | ")[0].strip("| "): line for line in tune.proxy_table(results) if line.startswith("| ")
    }
    # Hybrid maps must lead by the margin (0.002): 0.001 is not enough, 0.003 is.
    assert rows["close"].endswith("| shared | hybrid |")
    assert rows["apart"].endswith("| hybrid | shared |")
