"""Hybrid maps' mixtures: the patch sample, the per-cluster Gaussians of the full and fold models, the
nearest-cluster distance in the scorer, and mixtures through fitting, saving and loading."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fit_small

from gaussad import GaussAD
from gaussad.accumulate import positional_values
from gaussad.errors import GaussADError
from gaussad.gaussian import fit_gaussian
from gaussad.layout import list_test_images, training_images
from gaussad.mixture import (
    MIN_CLUSTER_PATCHES,
    GaussianMixture,
    PatchSample,
    fit_mixtures,
    mixture_distance_map,
)
from gaussad.scorer import MapHead


def brute_force(features: np.ndarray, mixture: GaussianMixture) -> np.ndarray:
    """Per position of feature maps (B, C, H, W), the smallest distance over the mixture's Gaussians, one
    Gaussian at a time in float64."""
    rows = features.transpose(0, 2, 3, 1).astype(np.float64)
    distances = [
        np.linalg.norm((rows - mean) @ whitening, axis=-1)
        for mean, whitening in zip(mixture.mean, mixture.whitening, strict=True)
    ]
    return np.min(distances, axis=0)


def two_clusters(rng: np.random.Generator, per_cluster: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Patches (N, 6) around two centres 40 apart on the first axis, float32 values as a sample holds
    them, and each one's fold (5 folds)."""
    centres = np.zeros((2, 6))
    centres[1, 0] = 40.0
    rows = np.concatenate([centre + rng.normal(size=(per_cluster, 6)) for centre in centres])
    return rows.astype(np.float32).astype(np.float64), rng.integers(0, 5, size=len(rows))


def sample_of(rows: np.ndarray, folds: np.ndarray) -> PatchSample:
    sample = PatchSample(1)
    sample.rows, sample.folds = [rows.astype(np.float32)], [folds]
    return sample


def test_the_sample_is_the_same_whatever_the_batches_or_shards() -> None:
    features = torch.randn(10, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    indices, folds = list(range(10)), [index // 2 for index in range(10)]
    whole = PatchSample.for_images(10, budget=120)
    assert whole.per_image == 12  # of 36 positions per image
    values = positional_values(features).numpy()
    whole.add(values, indices, folds)
    first, second = PatchSample(whole.per_image), PatchSample(whole.per_image)
    first.add(values[:3], indices[:3], folds[:3])
    for start in (3, 7):  # a shard of two batches
        second.add(values[start : start + 4], indices[start : start + 4], folds[start : start + 4])
    first.extend(second)
    rows, row_folds = whole.arrays()
    np.testing.assert_array_equal(rows, first.arrays()[0])
    np.testing.assert_array_equal(row_folds, np.repeat(folds, 12))
    # Each image's own positions, chosen by its index: another image at the same index picks the same.
    vectors = features.flatten(2).transpose(1, 2).numpy()
    assert all(any(np.array_equal(row, vector) for vector in vectors[0]) for row in rows[:12])
    assert len({tuple(row) for row in rows[:12]}) == 12  # no position twice


def test_a_mixture_measures_a_patch_by_its_nearest_cluster() -> None:
    rows, folds = two_clusters(np.random.default_rng(0))
    one = fit_gaussian(rows, "none", 1.0)
    (mixture,) = fit_mixtures(sample_of(rows, folds), 2, [None], [one.n_components], "none", 1.0)
    assert isinstance(mixture, GaussianMixture) and mixture.n_clusters == 2
    points = np.zeros((3, 6))
    points[1, 0], points[2, 0] = 40.0, 20.0  # the two centres, and halfway: typical of one wide Gaussian
    as_maps = torch.from_numpy(points.T[None, :, :, None]).float()  # (1, 6, 3, 1)
    mean, whitening = (torch.from_numpy(a).float() for a in (mixture.mean, mixture.whitening))
    distances = mixture_distance_map(as_maps, mean, whitening)[0, :, 0].numpy()
    np.testing.assert_allclose(distances, brute_force(as_maps.numpy(), mixture)[0, :, 0], rtol=1e-5)
    single = np.linalg.norm((points - one.mean) @ one.whitening, axis=-1)
    assert distances[:2].max() < 1.5 * math.sqrt(one.n_components) and distances[2] > 10 * single[2]


def test_fold_mixtures_share_the_clusters_and_leave_their_fold_out() -> None:
    rows, folds = two_clusters(np.random.default_rng(1))
    rows[:, 1] = (rows[:, 1] + rows[:, 0] * 0.01).astype(np.float32)  # components that differ per cluster
    full, fold_two = fit_mixtures(sample_of(rows, folds), 2, [None, 2], [3, 5], "opca", 0.5)
    cluster = rows[:, 0] > 20.0
    order = np.argsort(full.mean[:, 0])  # k-means numbers the clusters as it likes
    for index, members in zip(order, (~cluster, cluster), strict=True):
        outside = members & (folds != 2)
        np.testing.assert_allclose(full.mean[index], rows[members].mean(axis=0))
        np.testing.assert_allclose(fold_two.mean[index], rows[outside].mean(axis=0))
        # Scaled to the case's one Gaussian: sqrt(3 / d) for the full model, sqrt(5 / d) for the fold's.
        own = fit_gaussian(rows[outside], "opca", 0.5)
        expected = own.whitening * math.sqrt(5 / own.n_components)
        np.testing.assert_allclose(fold_two.whitening[index][:, : own.n_components], expected)
        assert not fold_two.whitening[index][:, own.n_components :].any()  # padding adds nothing


def test_too_few_patches_for_any_cluster_make_one_gaussian() -> None:
    rows, folds = two_clusters(np.random.default_rng(2), per_cluster=MIN_CLUSTER_PATCHES)
    (mixture,) = fit_mixtures(sample_of(rows, np.zeros(len(rows), int)), 16, [None], [2], "none", 1.0)
    assert mixture.n_clusters == 2  # at most one cluster per MIN_CLUSTER_PATCHES patches
    few = sample_of(rows[:MIN_CLUSTER_PATCHES], folds[:MIN_CLUSTER_PATCHES])
    (alone,) = fit_mixtures(few, 16, [int(folds[0])], [2], "none", 1.0)
    assert alone.n_clusters == 1  # the one cluster has fewer patches outside the fold: all of them, alone
    np.testing.assert_allclose(alone.mean[0], rows[:MIN_CLUSTER_PATCHES][folds[:8] != folds[0]].mean(axis=0))


def test_hybrid_maps_take_the_mixtures_in_their_shared_half(
    category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = fit_small(training_images(category), localization="hybrid", image_score="pooled")
    state = model.state_
    assert state.mixture_levels == state.map_levels == (3, 4, 5)
    assert all(isinstance(g, GaussianMixture) for g in state.map_gaussians)
    map_rows = [row for row in model.describe_levels() if row["role"] == "map"]
    assert [row["clusters"] > 1 for row in map_rows] == [True] * 3
    from gaussad.evaluation import model_info

    shown = {f"map {row['level']}": row["clusters"] for row in map_rows}
    assert model_info(model)["mixture clusters per level"] == shown  # what reports show
    tests = [item.path for item in list_test_images(category)][:4]
    head: MapHead = model.scorer_.map_head
    from gaussad.features import BatchRunner

    runner = BatchRunner(model.scorer_.features, model.backbone_.preprocessing, model.input_size_, "cpu")
    (batch,) = list(runner.batches(tests))
    features = [batch.outputs[index] for index in model.scorer_.map_indices]
    for level_map, level_features, mixture in zip(
        head.level_maps(features), features, state.map_gaussians, strict=True
    ):
        np.testing.assert_allclose(level_map.numpy(), brute_force(level_features.numpy(), mixture), rtol=1e-4)
    # Saved and loaded: the same mixtures, the same scores and maps; `gaussad info` names them.
    folder = model.save(tmp_path / "model")
    loaded = GaussAD.load(folder, device="cpu")
    assert loaded.state_.mixture_levels == (3, 4, 5) and loaded.mixture_clusters == model.mixture_clusters
    expected, found = model.predict(tests), loaded.predict(tests)
    np.testing.assert_allclose(found.scores, expected.scores, rtol=1e-6)
    np.testing.assert_allclose(np.stack(found.maps), np.stack(expected.maps), rtol=1e-6)
    from gaussad.cli import main

    assert main(["info", str(folder)]) == 0
    clusters = state.map_gaussians[0].n_clusters
    assert f"map      level 3: {clusters} Gaussians of up to" in capsys.readouterr().out


def test_one_cluster_or_shared_maps_keep_one_gaussian_per_level(category: Path) -> None:
    train = training_images(category)
    from gaussad.evaluation import model_info

    for options in ({"localization": "hybrid", "mixture_clusters": 1}, {"localization": "shared"}):
        model = fit_small(train, image_score="pooled", **options)
        assert model.state_.mixture_levels == () and "mixture clusters per level" not in model_info(model)
        assert not any(isinstance(g, GaussianMixture) for g in model.state_.map_gaussians)
    with pytest.raises(GaussADError, match="--mixture-clusters 0"):
        GaussAD(mixture_clusters=0).fit(train)


def test_models_saved_before_mixtures_load_with_one_gaussian(category: Path, tmp_path: Path) -> None:
    """Format version 6 had no mixtures: such a model loads with `mixture_clusters` 1, as it was fitted."""
    from gaussad.fileio import file_sha256
    from gaussad.modelfolder import CONFIG_FILE, TENSORS_FILE

    model = fit_small(training_images(category)[:8], localization="hybrid", mixture_clusters=1)
    folder = model.save(tmp_path / "model")
    document = json.loads((folder / CONFIG_FILE).read_text())
    del document["params"]["mixture_clusters"], document["mixture_levels"]
    document |= {"format_version": 6, "tensors_sha256": file_sha256(folder / TENSORS_FILE)}
    (folder / CONFIG_FILE).write_text(json.dumps(document))
    loaded = GaussAD.load(folder, device="cpu")
    assert loaded.mixture_clusters == 1 and loaded.state_.mixture_levels == ()
    tests = [item.path for item in list_test_images(category)][:4]
    np.testing.assert_allclose(loaded.score_samples(tests), model.score_samples(tests), rtol=1e-6)
    # A mixture where the model has no hybrid map is refused.
    model = fit_small(training_images(category)[:8], localization="shared")
    folder = model.save(tmp_path / "shared")
    saved = json.loads((folder / CONFIG_FILE).read_text()) | {"mixture_levels": [3]}
    (folder / CONFIG_FILE).write_text(json.dumps(saved))
    with pytest.raises(GaussADError, match="mixture levels"):
        GaussAD.load(folder, device="cpu")
