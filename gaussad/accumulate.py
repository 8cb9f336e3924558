"""Streaming the training feature maps of one level into its Gaussian.

Fitting must not hold every training feature map in memory. The first pass accumulates float64 moments
batch by batch and appends the float32 features to a temporary file on disk; once the covariance (and so
the PCA) is known, one sequential read of that file gives the fourth-moment sum that Ledoit-Wolf shrinkage
needs in the reduced space. The result equals fitting on all features at once, without a second forward
pass of the backbone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gaussad.gaussian import Gaussian, Reduction, fit_projection, gaussian_from_moments

_READ_CHUNK_VALUES = 1 << 22  # float32 values per read of the spill file (16 MiB)


class LevelAccumulator:
    """Moments of one level's positional features, shared over positions or per position.

    `add` takes feature maps (B, C, H, W); `finish` returns the level's Gaussian: a mean (C,) and whitening
    (C, d) when shared, a mean (H*W, C) and whitening (H*W, C, d) per position.
    """

    def __init__(self, spill_path: Path, per_position: bool) -> None:
        self.spill_path = spill_path
        self.per_position = per_position
        self.count = 0
        self.grid: tuple[int, int] | None = None
        self._shift: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None

    def add(self, features: torch.Tensor) -> None:
        """Accumulate a batch of feature maps (B, C, H, W)."""
        batch, channels, height, width = features.shape
        if self.grid is None:
            self.grid = (height, width)
        elif self.grid != (height, width):
            raise ValueError(f"feature grid changed from {self.grid} to {(height, width)} within one fit")
        values = features.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).reshape(batch, -1, channels)
        with self.spill_path.open("ab") as spill:
            values.numpy().tofile(spill)
        wide = values.to(torch.float64)
        if self._shift is None:
            # Moments about a point near the mean: no cancellation when the mean is large against the spread.
            self._shift = wide.mean(dim=(0, 1))
        shifted = wide - self._shift
        if self.per_position:
            positions = shifted.transpose(0, 1)  # (P, B, C)
            batch_sum, batch_outer = positions.sum(dim=1), positions.transpose(1, 2) @ positions
        else:
            flat = shifted.reshape(-1, channels)
            batch_sum, batch_outer = flat.sum(dim=0), flat.T @ flat
        self._sum = batch_sum if self._sum is None else self._sum + batch_sum
        self._outer = batch_outer if self._outer is None else self._outer + batch_outer
        self.count += batch

    def finish(self, reduction: Reduction, variance: float) -> Gaussian:
        """The level's Gaussian, from the moments and one read of the spilled features."""
        if self._sum is None or self._outer is None or self._shift is None or self.grid is None:
            raise ValueError("no features were accumulated")
        shift = self._shift.numpy()
        total = self._sum.numpy()
        outer = self._outer.numpy()
        n_samples = self.count if self.per_position else self.count * self.grid[0] * self.grid[1]
        if self.per_position:
            shared_mean = total.sum(axis=0) / (n_samples * total.shape[0])
            shared_outer = outer.sum(axis=0) / (n_samples * total.shape[0])
        else:
            shared_mean, shared_outer = total / n_samples, outer / n_samples
        shared_covariance = shared_outer - np.outer(shared_mean, shared_mean)
        projection = fit_projection(shared_covariance, reduction, variance)

        if self.per_position:
            local_mean = total / n_samples  # (P, C)
            covariance = outer / n_samples - local_mean[:, :, None] * local_mean[:, None, :]
            mean = shift + local_mean
        else:
            covariance = shared_covariance
            mean = shift + shared_mean
        reduced_covariance = projection.T @ covariance @ projection
        quartic = self._quartic_sum(mean, projection)
        scale = float(np.trace(projection.T @ shared_covariance @ projection)) / projection.shape[1]
        return gaussian_from_moments(
            n_samples, mean, reduced_covariance, quartic, projection, variance_scale=scale
        )

    def _quartic_sum(self, mean: np.ndarray, projection: np.ndarray) -> np.ndarray:
        """Sum over training samples of ||(x - mean) @ projection||^4, read back from the spill file."""
        positions = self.grid[0] * self.grid[1]
        channels = projection.shape[0]
        per_image = positions * channels
        images_per_chunk = max(1, _READ_CHUNK_VALUES // per_image)
        quartic = np.zeros(positions if self.per_position else ())
        with self.spill_path.open("rb") as spill:
            while True:
                chunk = np.fromfile(spill, dtype=np.float32, count=images_per_chunk * per_image)
                if chunk.size == 0:
                    break
                values = chunk.reshape(-1, positions, channels).astype(np.float64)
                squared = np.sum(((values - mean) @ projection) ** 2, axis=-1)  # (b, P)
                quartic = quartic + (np.sum(squared**2, axis=0) if self.per_position else np.sum(squared**2))
        return quartic
