"""The statistics: Ledoit-Wolf as scikit-learn computes it, the reductions, Mahalanobis by one product."""

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA

from gaussad.errors import GaussADError
from gaussad.gaussian import (
    component_distance,
    fit_gaussian,
    ledoit_wolf_shrinkage,
    mahalanobis,
    sample_projection,
    select_components,
    shrink,
)


def correlated(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * rng.uniform(0.1, 3, size=d) + 5.0


@pytest.mark.parametrize(("n", "d"), [(50, 10), (209, 40), (12, 30), (2000, 5)])
def test_ledoit_wolf_equals_scikit_learn(n: int, d: int) -> None:
    samples = correlated(np.random.default_rng(n + d), n, d)
    reference = LedoitWolf().fit(samples)
    centered = samples - samples.mean(axis=0)
    covariance = centered.T @ centered / n
    quartic = np.sum(np.sum(centered**2, axis=1) ** 2)
    shrinkage = ledoit_wolf_shrinkage(n, covariance, quartic)
    assert shrinkage == pytest.approx(reference.shrinkage_, abs=1e-12)
    np.testing.assert_allclose(shrink(covariance, shrinkage), reference.covariance_, rtol=0, atol=1e-8)


def test_ledoit_wolf_is_batched() -> None:
    rng = np.random.default_rng(1)
    groups = [correlated(rng, 40, 6) for _ in range(3)]
    covariances, quartics = [], []
    for samples in groups:
        centered = samples - samples.mean(axis=0)
        covariances.append(centered.T @ centered / 40)
        quartics.append(np.sum(np.sum(centered**2, axis=1) ** 2))
    batched = ledoit_wolf_shrinkage(40, np.stack(covariances), np.array(quartics))
    expected = [LedoitWolf().fit(samples).shrinkage_ for samples in groups]
    np.testing.assert_allclose(batched, expected, atol=1e-12)


def test_opca_keeps_smallest_components_within_threshold() -> None:
    eigenvalues = np.array([1.0, 2.0, 3.0, 4.0, 90.0])  # total 100: shares 1%, 2%, 3%, 4%, 90%
    np.testing.assert_array_equal(select_components(eigenvalues, "opca", 0.05), [0, 1])  # 3% <= 5% < 6%
    np.testing.assert_array_equal(select_components(eigenvalues, "opca", 0.06), [0, 1, 2])
    np.testing.assert_array_equal(select_components(eigenvalues, "opca", 0.001), [0])  # at least one
    np.testing.assert_array_equal(select_components(eigenvalues, "none", 0.05), [0, 1, 2, 3, 4])


def test_pca_matches_scikit_learn_component_count() -> None:
    samples = correlated(np.random.default_rng(3), 300, 20)
    centered = samples - samples.mean(axis=0)
    eigenvalues = np.linalg.eigvalsh(centered.T @ centered / 300)
    for threshold in (0.5, 0.9, 0.95, 0.99):
        kept = select_components(eigenvalues, "pca", threshold)
        assert kept.size == PCA(n_components=threshold, svd_solver="full").fit(samples).n_components_
        assert kept[-1] == eigenvalues.size - 1  # the largest components


def test_opca_is_complement_of_pca() -> None:
    eigenvalues = np.sort(np.random.default_rng(4).exponential(size=50))
    small = select_components(eigenvalues, "opca", 0.05)
    large = select_components(eigenvalues, "pca", 0.95)
    assert set(small) | set(large) == set(range(50))
    assert len(set(small) & set(large)) <= 1  # only the component that straddles the threshold


def test_null_directions_are_dropped_and_constant_data_rejected() -> None:
    eigenvalues = np.array([0.0, 1e-18, 1.0, 2.0])
    assert 0 not in select_components(eigenvalues, "opca", 0.5)
    with pytest.raises(GaussADError, match="no variance"):
        select_components(np.zeros(4), "opca", 0.05)
    with pytest.raises(GaussADError, match="variance threshold"):
        select_components(eigenvalues, "opca", 1.5)


def test_fitted_gaussian_gives_the_mahalanobis_distance_of_reduced_ledoit_wolf() -> None:
    rng = np.random.default_rng(5)
    train = correlated(rng, 200, 12)
    queries = correlated(rng, 7, 12)
    gaussian = fit_gaussian(train, "opca", 0.2)

    # The same thing spelled out: PCA, keep components, Ledoit-Wolf, explicit inverse.
    mean = train.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(train.T, bias=True))
    projection = eigenvectors[:, select_components(eigenvalues, "opca", 0.2)]
    covariance = LedoitWolf().fit((train - mean) @ projection).covariance_
    reduced = (queries - mean) @ projection
    expected = np.sqrt(np.einsum("nd,de,ne->n", reduced, np.linalg.inv(covariance), reduced))

    got = mahalanobis(
        torch.from_numpy(queries), torch.from_numpy(gaussian.mean), torch.from_numpy(gaussian.whitening)
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)
    assert gaussian.n_components == projection.shape[1] < 12
    np.testing.assert_allclose(
        gaussian.component_distances(queries), expected / np.sqrt(gaussian.n_components), rtol=1e-9
    )


@pytest.mark.parametrize("reduction", ["opca", "pca", "none"])
def test_fewer_samples_than_dimensions_project_like_the_covariance(reduction: str) -> None:
    rng = np.random.default_rng(7)
    samples = correlated(rng, 30, 80)
    centered = samples - samples.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(centered.T @ centered / 30)
    # Centering leaves rank 29: the covariance's 51 null directions are dropped either way.
    variance = 0.05 if reduction == "opca" else 0.95
    expected = eigenvectors[:, select_components(eigenvalues, reduction, variance)]
    got = sample_projection(centered, reduction, variance)
    assert got.shape == expected.shape and got.shape[1] <= 29
    np.testing.assert_allclose(got.T @ got, np.eye(got.shape[1]), atol=1e-9)
    np.testing.assert_allclose(got @ got.T, expected @ expected.T, atol=1e-9)  # same subspace, signs aside

    queries = correlated(rng, 5, 80)
    wide = fit_gaussian(samples, reduction, variance)
    reduced = (queries - wide.mean) @ expected
    covariance = LedoitWolf().fit(centered @ expected).covariance_
    np.testing.assert_allclose(
        np.linalg.norm((queries - wide.mean) @ wide.whitening, axis=1),
        np.sqrt(np.einsum("nd,de,ne->n", reduced, np.linalg.inv(covariance), reduced)),
        rtol=1e-7,
    )


def test_component_distance_is_the_mahalanobis_distance_per_root_component() -> None:
    rng = np.random.default_rng(8)
    mean, whitening = torch.from_numpy(rng.normal(size=6)), torch.from_numpy(rng.normal(size=(6, 4)))
    features = torch.from_numpy(rng.normal(size=(3, 6)))
    torch.testing.assert_close(
        component_distance(features, mean, whitening), mahalanobis(features, mean, whitening) / 2
    )


def test_per_position_mahalanobis_is_batched_over_positions() -> None:
    rng = np.random.default_rng(6)
    means = torch.from_numpy(rng.normal(size=(4, 3)))
    whitenings = torch.from_numpy(rng.normal(size=(4, 3, 2)))
    features = torch.from_numpy(rng.normal(size=(4, 5, 3)))
    got = mahalanobis(features, means, whitenings)
    for p in range(4):
        expected = torch.linalg.vector_norm((features[p] - means[p]) @ whitenings[p], dim=-1)
        torch.testing.assert_close(got[p], expected)


def test_too_few_samples() -> None:
    with pytest.raises(GaussADError, match="at least 2"):
        fit_gaussian(np.ones((1, 3)), "opca", 0.05)


def test_whitening_by_cholesky_and_by_floored_eigenvalues_agree() -> None:
    from gaussad.gaussian import _floored_whitening

    rng = np.random.default_rng(7)
    samples = rng.normal(size=(4, 30, 6))
    covariances = np.einsum("pnc,pnd->pcd", samples, samples) / 30 + 0.05 * np.eye(6)
    covariances[3] = np.diag([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # singular: must be floored, not factorized
    floor = np.full(4, 1e-3)
    lowest = np.array([0.05, 0.05, 0.05, 0.0])  # a lower bound of each one's eigenvalues
    cholesky = _floored_whitening(covariances, lowest, floor)  # the first three clear the floor
    eigen = _floored_whitening(covariances, np.zeros(4), floor)  # forced through the eigenvalues
    vectors = rng.normal(size=(4, 6))
    norms = [np.linalg.norm(np.einsum("pc,pcd->pd", vectors, w), axis=1) for w in (cholesky, eigen)]
    np.testing.assert_allclose(norms[0][:3], norms[1][:3], rtol=1e-10)
    expected = np.einsum("pc,pcd,pd->p", vectors[:3], np.linalg.inv(covariances[:3]), vectors[:3])
    np.testing.assert_allclose(norms[0][:3] ** 2, expected, rtol=1e-10)
    assert np.isfinite(cholesky[3]).all()  # the singular one took the floored path
    assert norms[0][3] == pytest.approx(np.hypot(np.linalg.norm(vectors[3, :5]), vectors[3, 5] / 1e-3**0.5))


def test_cholesky_whitening_in_place_and_on_a_copy() -> None:
    from gaussad.gaussian import _cholesky_whitening

    rng = np.random.default_rng(8)
    samples = rng.normal(size=(3, 40, 5))
    covariances = np.einsum("pnc,pnd->pcd", samples, samples) / 40 + 0.1 * np.eye(5)
    original = covariances.copy()
    copied = _cholesky_whitening(covariances)
    np.testing.assert_array_equal(covariances, original)  # left as it was
    for w, c in zip(copied, covariances, strict=True):
        np.testing.assert_allclose(w @ w.T, np.linalg.inv(c), rtol=1e-10)
        assert np.allclose(np.tril(w, -1), 0.0)  # W = L^-T is upper triangular
    in_place = _cholesky_whitening(covariances, overwrite=True)
    assert np.shares_memory(in_place, covariances)
    np.testing.assert_array_equal(in_place, copied)
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        _cholesky_whitening(np.diag([1.0, -1.0])[None])


@pytest.mark.parametrize(("reduction", "variance"), [("opca", 0.05), ("pca", 0.9), ("none", 1.0)])
def test_reduce_in_place_keeps_what_fit_projection_keeps(reduction, variance) -> None:
    from gaussad.gaussian import fit_projection, reduce_in_place

    rng = np.random.default_rng(7)
    samples = rng.normal(size=(200, 30)) @ (rng.normal(size=(30, 30)) * np.linspace(0.1, 3.0, 30))
    covariance = np.cov(samples.T, bias=True)
    expected = fit_projection(covariance, reduction, variance)
    expected_reduced = expected.T @ covariance @ expected
    projection, reduced = reduce_in_place(covariance.copy(), reduction, variance)
    assert projection.shape == expected.shape
    np.testing.assert_allclose(projection @ projection.T, expected @ expected.T, atol=1e-9)
    # The same Mahalanobis distances: the reduced covariances are one rotation apart.
    rotation = expected.T @ projection
    np.testing.assert_allclose(rotation @ reduced @ rotation.T, expected_reduced, atol=1e-9)
