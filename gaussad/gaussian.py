"""Multivariate Gaussians over reduced features: the statistics of the method, in float64.

A level's Gaussian is fitted from moments (count, mean, covariance, and the fourth-moment sum that the
Ledoit-Wolf estimator needs), so that fitting can stream over batches instead of holding every feature.
Scoring uses one whitening matrix per Gaussian: the Mahalanobis distance becomes one matrix product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import lapack

from gaussad.config import REDUCTIONS
from gaussad.errors import GaussADError

Reduction = Literal["opca", "pca", "none"]

# Eigenvalues below this fraction of the mean variance are numerically zero: directions in which every
# training sample was identical (a constant image corner, a dead channel) carry no usable spread.
_NULL_VARIANCE = 1e-10
# Floor of the shrunk eigenvalues, relative to their mean: keeps the precision finite where a
# per-position covariance is exactly singular.
_EIGENVALUE_FLOOR = 1e-6


def select_components(eigenvalues: np.ndarray, reduction: Reduction, variance: float) -> np.ndarray:
    """Indices of the principal components a reduction keeps, given eigenvalues in ascending order.

    `opca` keeps the smallest-variance components whose cumulative share of the variance stays within
    `variance` (at least one); `pca` keeps the largest components until their share reaches `variance`
    (scikit-learn's rule); `none` keeps all. opca(t) is thus the complement of pca(1 - t).
    """
    usable = np.flatnonzero(eigenvalues > _NULL_VARIANCE * max(eigenvalues.mean(), 0.0))
    if usable.size == 0:
        raise GaussADError("the training features have no variance: are all training images identical?")
    if reduction == "none":
        return usable
    if not 0.0 < variance <= 1.0:
        raise GaussADError(f"variance threshold {variance}: expected a fraction in (0, 1]")
    values = eigenvalues[usable]
    share = values / values.sum()
    if reduction == "opca":
        keep = max(1, int(np.searchsorted(np.cumsum(share), variance, side="right")))
        return usable[:keep]
    if reduction == "pca":
        from_largest = np.cumsum(share[::-1])
        keep = min(values.size, int(np.searchsorted(from_largest, variance - 1e-12)) + 1)
        return usable[values.size - keep :]
    raise GaussADError(f"unknown reduction {reduction!r}: expected one of {', '.join(REDUCTIONS)}")


def ledoit_wolf_shrinkage(count: int, covariance: np.ndarray, quartic_sum: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrinkage intensity from moments, equal to scikit-learn's `ledoit_wolf_shrinkage`.

    covariance: (..., d, d) empirical (biased) covariance; quartic_sum: (...) sum over samples of
    ||x - mean||^4. Batched over leading dimensions.
    """
    d = covariance.shape[-1]
    if d == 1:
        return np.zeros(covariance.shape[:-2])
    trace = np.trace(covariance, axis1=-2, axis2=-1)
    mu = trace / d
    delta_ = np.einsum("...ij,...ij->...", covariance, covariance)  # no squared copy: 10x faster
    beta = (quartic_sum / count - delta_) / (d * count)
    delta = (delta_ - 2.0 * mu * trace + d * mu**2) / d
    beta = np.minimum(beta, delta)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(beta == 0, 0.0, beta / delta)


def shrink(covariance: np.ndarray, shrinkage: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """(1 - s) * S + s * trace(S) / d * I, batched: scikit-learn's `shrunk_covariance`. With
    `overwrite` the result is written over the covariance (float64, contiguous), not into another as large."""
    d = covariance.shape[-1]
    s = np.asarray(shrinkage, dtype=np.float64)
    mu = np.trace(covariance, axis1=-2, axis2=-1) / d
    if overwrite:
        shrunk = covariance
        shrunk *= (1.0 - s)[..., None, None]
    else:
        shrunk = covariance * (1.0 - s)[..., None, None]
    # The diagonals as a strided view: no identity matrix as large as the covariances (per position: 36 MB).
    shrunk.reshape(*shrunk.shape[:-2], d * d)[..., :: d + 1] += (s * mu)[..., None]
    return shrunk


@dataclass
class Gaussian:
    """A fitted Gaussian over one level's features, reduced to d components.

    mean: (..., C); whitening: (..., C, d) such that ||(x - mean) @ whitening|| is the Mahalanobis
    distance under the shrunk covariance. Leading dimensions index positions (per-position Gaussians).
    """

    mean: np.ndarray
    whitening: np.ndarray
    shrinkage: np.ndarray

    @property
    def n_components(self) -> int:
        return int(self.whitening.shape[-1])

    def astype(self, dtype: np.dtype | type) -> Gaussian:
        """The same Gaussian with mean and whitening in `dtype` (float32 halves a per-position model)."""
        return Gaussian(self.mean.astype(dtype), self.whitening.astype(dtype), self.shrinkage)

    def to_torch(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and whitening in float32 on `device`, ready for `mahalanobis`."""
        mean = torch.from_numpy(self.mean).to(device=device, dtype=torch.float32)
        whitening = torch.from_numpy(self.whitening).to(device=device, dtype=torch.float32)
        return mean, whitening

    def component_distances(self, samples: np.ndarray) -> np.ndarray:
        """`component_distance` of samples (N, C) held in memory, in float64 on the CPU (fit-time scoring)."""
        tensors = (np.asarray(values, dtype=np.float64) for values in (samples, self.mean, self.whitening))
        return component_distance(*(torch.from_numpy(t) for t in tensors)).numpy()


def mahalanobis(features: torch.Tensor, mean: torch.Tensor, whitening: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance of features (..., C) as one matrix product.

    For a shared Gaussian (mean (C,), whitening (C, d)) any leading shape works. For per-position
    Gaussians (mean (P, C), whitening (P, C, d)) features are (P, N, C) and the product is batched over P.
    """
    if whitening.ndim == 2:
        return torch.linalg.vector_norm((features - mean) @ whitening, dim=-1)
    return torch.linalg.vector_norm(torch.bmm(features - mean[:, None, :], whitening), dim=-1)


def component_distance(features: torch.Tensor, mean: torch.Tensor, whitening: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance divided by the square root of the components kept: the root mean square
    whitened coordinate, about 1 for a typical normal sample whatever the dimension. Image scores sum it
    over levels; with grid-pooled features the components grow with the training images, and this keeps
    the scores of fold models (label-free calibration) on the scale of the full model's."""
    return mahalanobis(features, mean, whitening) / math.sqrt(whitening.shape[-1])


def fit_projection(covariance: np.ndarray, reduction: Reduction, variance: float) -> np.ndarray:
    """Orthonormal (C, d) projection onto the components a reduction keeps; the identity where it keeps
    them all, since a rotation changes no distance (and per-position moments then skip rotating)."""
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    kept = select_components(eigenvalues, reduction, variance)
    if kept.size == covariance.shape[0]:
        return np.eye(kept.size)
    return eigenvectors[:, kept]


def reduce_in_place(
    covariance: np.ndarray, reduction: Reduction, variance: float
) -> tuple[np.ndarray, np.ndarray]:
    """The kept eigenvectors (C, d) of a large covariance and the covariance in their basis (diagonal: their
    eigenvalues), from one decomposition that overwrites the covariance. MRRR needs a workspace of a few
    vectors where the default divide and conquer holds two more C x C matrices: 50 MB at C = 1,792."""
    eigenvalues, vectors = scipy.linalg.eigh(covariance, overwrite_a=True, driver="evr", check_finite=False)
    kept = select_components(eigenvalues, reduction, variance)
    return vectors[:, kept], np.diag(eigenvalues[kept])


def is_identity(projection: np.ndarray) -> bool:
    """Whether a projection keeps the features as they are (see `fit_projection`)."""
    return projection.shape[0] == projection.shape[1] and np.array_equal(projection, np.eye(len(projection)))


def gaussian_from_moments(
    count: int,
    mean: np.ndarray,
    reduced_covariance: np.ndarray,
    quartic_sum: np.ndarray,
    projection: np.ndarray,
    variance_scale: float | None = None,
    overwrite: bool = False,
) -> Gaussian:
    """The Gaussian of reduced features z = (x - mean) @ projection, from their moments.

    reduced_covariance (..., d, d) and quartic_sum (...) describe z; the covariance is shrunk with
    Ledoit-Wolf, then factorized: by Cholesky where shrinkage keeps every eigenvalue above the floor, else by
    a symmetric eigendecomposition whose eigenvalues are floored, so the precision stays finite and symmetric
    even where the covariance is singular. The floor is relative to `variance_scale` (default: each
    covariance's own mean variance); per-position Gaussians pass the level's mean variance, since a constant
    position has no scale of its own. `overwrite`: the covariance may be overwritten (one copy less: per
    position, 36 MB on the tiles).
    """
    shrinkage = ledoit_wolf_shrinkage(count, reduced_covariance, quartic_sum)
    shrunk = shrink(reduced_covariance, shrinkage, overwrite=overwrite)
    d = shrunk.shape[-1]
    mean_variance = np.trace(shrunk, axis1=-2, axis2=-1) / d  # shrinking keeps the trace
    scale = mean_variance if variance_scale is None else np.full(mean_variance.shape, variance_scale)
    floor = _EIGENVALUE_FLOOR * np.maximum(scale, np.finfo(np.float64).tiny)
    lowest = np.ravel(shrinkage * mean_variance)
    whitening = _floored_whitening(shrunk.reshape(-1, d, d), lowest, np.ravel(floor), overwrite=overwrite)
    whitening = whitening.reshape(shrunk.shape)
    if not is_identity(projection):
        whitening = projection @ whitening
    return Gaussian(mean=mean, whitening=whitening, shrinkage=np.asarray(shrinkage))


def _floored_whitening(
    covariances: np.ndarray, lowest: np.ndarray, floor: np.ndarray, overwrite: bool = False
) -> np.ndarray:
    """W (N, d, d) with W W^T the inverse of each covariance (N, d, d), its eigenvalues floored at floor (N,).

    A shrunk covariance has no eigenvalue below shrinkage * mean variance (`lowest`); where that clears the
    floor, flooring changes nothing and a Cholesky factor gives W = L^-T, about 6x faster than the
    eigendecomposition. Elsewhere the
    eigenvalues are floored explicitly. Both give the same Mahalanobis distances.
    """
    safe = lowest >= floor
    if safe.all():  # the usual case, without copies of the covariances: memory peaks here when fitting
        return _cholesky_whitening(covariances, overwrite)
    whitening = np.empty_like(covariances)
    if safe.any():
        whitening[safe] = _cholesky_whitening(covariances[safe], overwrite=True)  # indexing made a copy
    if not safe.all():
        eigenvalues, eigenvectors = np.linalg.eigh(covariances[~safe])
        kept = np.maximum(eigenvalues, floor[~safe][:, None])
        whitening[~safe] = eigenvectors / np.sqrt(kept)[:, None, :]
    return whitening


def _cholesky_whitening(covariances: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """W = L^-T for each Cholesky factor L of the covariances (N, d, d): W W^T is the inverse. `overwrite`
    works in place (the covariances, contiguous float64, then hold W): one per-position copy less.

    LAPACK's potrf and trtri, one matrix at a time: a third of the time of PyTorch's batched Cholesky and
    triangular solve against the identity (benchmarks/README.md).
    """
    in_place = overwrite and covariances.dtype == np.float64 and covariances.flags.c_contiguous
    whitening = covariances if in_place else np.array(covariances, dtype=np.float64, order="C")
    for matrix in whitening:
        # A symmetric matrix read in Fortran order is itself; its lower factor L, inverted in place there,
        # reads as L^-T in C order.
        factor, info = lapack.dpotrf(matrix.T, lower=1, clean=1, overwrite_a=1)
        if info == 0:
            _, info = lapack.dtrtri(factor, lower=1, overwrite_c=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"covariance is not positive definite (LAPACK info {info})")
    return whitening


def sample_projection(centered: np.ndarray, reduction: Reduction, variance: float) -> np.ndarray:
    """Orthonormal (C, d) projection onto the components a reduction keeps, from centered samples (N, C).

    With fewer samples than dimensions (grid-pooled features: channels x cells per image) the covariance
    has rank below N, and the N x N Gram matrix gives the same non-zero spectrum far faster; only the
    kept axes are mapped back to feature space.
    """
    n_samples, n_dims = centered.shape
    if n_samples >= n_dims:
        return fit_projection(centered.T @ centered / n_samples, reduction, variance)
    eigenvalues, vectors = np.linalg.eigh(centered @ centered.T / n_samples)
    positive = np.flatnonzero(eigenvalues > 0)  # the rest is the null space of the samples
    kept = positive[select_components(eigenvalues[positive], reduction, variance)]
    return centered.T @ vectors[:, kept] / np.sqrt(n_samples * eigenvalues[kept])


def fit_gaussian(samples: np.ndarray, reduction: Reduction, variance: float) -> Gaussian:
    """Fit a reduced Ledoit-Wolf Gaussian to samples (N, C) held in memory (pooled image features)."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.shape[0] < 2:
        raise GaussADError(f"need at least 2 training images, got {samples.shape[0]}")
    mean = samples.mean(axis=0)
    centered = samples - mean
    projection = sample_projection(centered, reduction, variance)
    reduced = centered @ projection
    covariance = reduced.T @ reduced / samples.shape[0]
    quartic = np.sum(np.sum(reduced**2, axis=1) ** 2)
    return gaussian_from_moments(samples.shape[0], mean, covariance, quartic, projection)
