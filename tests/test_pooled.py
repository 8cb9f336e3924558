"""The image score's Gaussians from stored pooled features: from samples or from sums, the same models."""

import numpy as np
import pytest

from gaussad import pooled
from gaussad.gaussian import fit_gaussian
from gaussad.pooled import PooledFeatures, fit_level
from gaussad.store import DiskStore


def spilled(tmp_path, samples: np.ndarray, batch: int = 7) -> PooledFeatures:
    spill = PooledFeatures(DiskStore(tmp_path / "pooled.f32"))
    for start in range(0, len(samples), batch):
        spill.add(samples[start : start + batch])
    return spill


def features(n: int, dims: int, seed: int = 0) -> np.ndarray:
    """Float32 features with a large mean against their spread, as pooled backbone features."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dims, dims)) * np.linspace(0.05, 2.0, dims)
    return (rng.normal(size=(n, dims)) @ mixing + 20.0).astype(np.float32)


def precision(gaussian) -> np.ndarray:
    return gaussian.whitening @ gaussian.whitening.T


@pytest.mark.parametrize(("n", "dims"), [(30, 40), (90, 12)], ids=["samples", "sums"])
def test_full_and_fold_models_equal_fits_on_samples(tmp_path, monkeypatch, n: int, dims: int) -> None:
    monkeypatch.setattr(pooled, "_READ_CHUNK_VALUES", 5 * dims)  # several chunks per read
    samples = features(n, dims)
    spill = spilled(tmp_path, samples)
    assert spill.streamed == (n > dims)
    fold_of = np.arange(n) * 3 // n
    full, folds, distances = fit_level(spill, fold_of, 3, "opca", 0.2)
    expected = fit_gaussian(samples, "opca", 0.2)
    np.testing.assert_allclose(full.mean, expected.mean, rtol=1e-12)
    np.testing.assert_allclose(precision(full), precision(expected), rtol=1e-7, atol=1e-9)
    for fold, gaussian in enumerate(folds):
        held = fold_of == fold
        reference = fit_gaussian(samples[~held], "opca", 0.2)
        # From sums, the fold models are kept in float32 (they only score synthetic defects).
        tolerance = 1e-5 if spill.streamed else 1e-7
        scale = np.abs(precision(reference)).max()
        np.testing.assert_allclose(
            precision(gaussian), precision(reference), rtol=tolerance, atol=tolerance * scale
        )
        np.testing.assert_allclose(distances[held], reference.component_distances(samples[held]), rtol=1e-7)


def test_spill_reads_back_what_was_added(tmp_path) -> None:
    samples = features(20, 6)
    spill = spilled(tmp_path, samples, batch=3)
    np.testing.assert_array_equal(spill.load(), samples)
    rows = np.arange(20) % 3 == 0
    np.testing.assert_array_equal(np.concatenate(list(spill.chunks(rows))), samples[rows].astype(np.float64))
