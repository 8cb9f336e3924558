"""One level's pooled image features over the training images: the image score's Gaussians, full and per fold.

The features are kept in a feature store (float32, exactly as pooled) as the images pass. Where there are
no more images than dimensions, they are read back whole and fitted as samples (`fit_gaussian`: the Gram
matrix is then the smaller problem); beyond that, holding them would grow the fit's memory with every image,
so each Gaussian is fitted from sums read back in chunks: the covariance from the outer sums of all images
less those of the held-out fold, then the fourth moment in the reduced space. Memory is then bounded by a few
dimension x dimension matrices, whatever the number of images.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from gaussad.gaussian import Gaussian, Reduction, fit_gaussian, gaussian_from_moments, reduce_in_place
from gaussad.store import FeatureStore

_READ_CHUNK_VALUES = 1 << 20  # float32 values per read (4 MiB)


class PooledFeatures:
    """Pooled features (n, D) of one level, added batch by batch to a feature store."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store

    @property
    def count(self) -> int:
        return self.store.count

    @property
    def dims(self) -> int:
        return self.store.row_values

    def add(self, values: np.ndarray) -> None:
        """Add the pooled features (b, D) of the next images."""
        self.store.append(values)

    @property
    def streamed(self) -> bool:
        """Whether the Gaussians are fitted from sums (more images than dimensions) rather than samples."""
        return self.count > self.dims

    def load(self) -> np.ndarray:
        """All features (n, D), float32."""
        return next(self.store.read(0, self.count, max(self.count, 1)))[1]

    def chunks(self, rows: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Float64 features of the images where `rows` (bool, n) is true (default: all), in order, a chunk
        at a time."""
        per_chunk = max(1, _READ_CHUNK_VALUES // max(self.dims, 1))
        for start, chunk in self.store.read(0, self.count, per_chunk):
            if rows is not None:
                chunk = chunk[rows[start : start + len(chunk)]]
            yield chunk.astype(np.float64)


def fit_level(
    features: PooledFeatures, fold_of: np.ndarray, n_folds: int, reduction: Reduction, variance: float
) -> tuple[Gaussian, list[Gaussian], np.ndarray]:
    """The Gaussian of all images, one per fold fitted without that fold's images, and each image's
    component distance under the Gaussian of its fold (zeros without folds)."""
    if not features.streamed:
        samples = features.load()
        full = fit_gaussian(samples, reduction, variance)
        folds, distances = [], np.zeros(len(samples) if n_folds else 0)
        for fold in range(n_folds):
            held = fold_of == fold
            folds.append(fit_gaussian(samples[~held], reduction, variance))
            distances[held] = folds[-1].component_distances(samples[held])
        return full, folds, distances
    shift = next(features.chunks()).mean(axis=0)  # sums about a point near the mean: no cancellation
    total, outer = _sums(features, None, shift)
    full = _fit_from_sums(features, None, features.count, total, outer, shift, reduction, variance)
    folds, distances = [], np.zeros(features.count if n_folds else 0)
    for fold in range(n_folds):
        held = fold_of == fold
        held_total, held_outer = _sums(features, held, shift)
        held_outer = np.subtract(outer, held_outer, out=held_outer)  # in place: one matrix less
        count = int((~held).sum())
        gaussian = _fit_from_sums(
            features, ~held, count, total - held_total, held_outer, shift, reduction, variance, True
        )
        distances[held] = np.concatenate(
            [gaussian.component_distances(chunk) for chunk in features.chunks(held)]
        )
        # Kept only to score synthetic defects (auto options): float32 halves five models whose size
        # grows with the images until there are as many as dimensions.
        folds.append(gaussian.astype(np.float32))
    return full, folds, distances


def _sums(
    features: PooledFeatures, rows: np.ndarray | None, shift: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sum and outer-product sum (D, D) of the selected images' features less `shift`."""
    total = np.zeros(features.dims)
    outer = np.zeros((features.dims, features.dims))
    accumulated = torch.from_numpy(outer)  # shares its memory: each chunk's product added in place
    for chunk in features.chunks(rows):
        chunk -= shift
        total += chunk.sum(axis=0)
        values = torch.from_numpy(chunk)
        accumulated.addmm_(values.T, values)
    return total, outer


def _fit_from_sums(
    features: PooledFeatures,
    rows: np.ndarray | None,
    count: int,
    total: np.ndarray,
    outer: np.ndarray,
    shift: np.ndarray,
    reduction: Reduction,
    variance: float,
    overwrite: bool = False,
) -> Gaussian:
    """The Gaussian of `count` images from their sums about `shift`, and one more read for the fourth
    moment in the reduced space (what Ledoit-Wolf shrinkage needs). `overwrite`: the covariance is built
    in place of `outer`."""
    offset = total / count
    covariance = np.divide(outer, count, out=outer if overwrite else None)
    covariance -= np.outer(offset, offset)
    projection, reduced = reduce_in_place(covariance, reduction, variance)
    mean = shift + offset
    quartic = 0.0
    for chunk in features.chunks(rows):
        coordinates = (chunk - mean) @ projection
        quartic += float(np.sum(np.sum(coordinates**2, axis=1) ** 2))
    return gaussian_from_moments(count, mean, reduced, quartic, projection)
