"""Streaming the training feature maps of one level into its Gaussian.

Fitting must not hold every training feature map in memory. The first pass accumulates float64 moments
(`gaussad.moments.Moments`, mergeable across shards of the images) batch by batch and appends the float32
features to a temporary file on disk, the feature store; once the covariance (and so the PCA) is known,
one sequential read of that file gives the fourth-moment sum that Ledoit-Wolf shrinkage needs in the
reduced space. Per position, outer sums are kept for all images together, and those of a fold are read
back from the file, a batch at a time, when calibration needs the Gaussian without it. The result equals
fitting on all features at once, without a second forward pass of the backbone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from gaussad.gaussian import Gaussian, Reduction, fit_projection, gaussian_from_moments, is_identity
from gaussad.moments import Moments

_READ_CHUNK_VALUES = 1 << 20  # float32 values per read of the spill file (4 MiB)
# The fourth-moment pass reads fewer images at a time: its float64 products (rows x projected widths) then
# stay in cache. Bottle's three map levels and six cases (their shapes, one thread): 0.45 -> 0.30 s.
_QUARTIC_BLOCK_BYTES = 2 << 20


class _Case(NamedTuple):
    """One set of training images (all, or all outside one fold) before its covariance: what the fourth-
    moment pass needs. The per-position covariance (36 MB per case on the tiles) is built only afterwards,
    one case at a time."""

    exclude_fold: int | None
    count: int
    mean: np.ndarray
    shifted_mean: np.ndarray  # the mean less the accumulator's shift: ([P,] C)
    projection: np.ndarray
    variance_scale: float
    shared_covariance: np.ndarray


class LevelAccumulator:
    """A level's `Moments` and its spilled features: what one level's Gaussians are finished from.

    `add` takes feature maps (B, C, H, W); `finish` returns the level's Gaussian: a mean (C,) and whitening
    (C, d) when shared, a mean (H*W, C) and whitening (H*W, C, d) per position. Moments are kept per fold
    of the training images, so that `finish(exclude_fold=f)` gives the Gaussian of all other folds: what
    label-free calibration needs, without another pass of the backbone. Moments accumulated elsewhere (a
    shard of the images on another worker) join with `add_moments`, their features with `spill_values`.
    """

    def __init__(self, spill_path: Path, per_position: bool, n_folds: int = 1) -> None:
        self.spill_path = spill_path
        self.per_position = per_position
        self.n_folds = n_folds
        self.moments = Moments(per_position, n_folds)

    @property
    def folds(self) -> list[int]:
        return self.moments.folds

    @property
    def grid(self) -> tuple[int, int] | None:
        return self.moments.grid

    def add(self, features: torch.Tensor, folds: Sequence[int] | None = None) -> None:
        """Accumulate a batch of feature maps (B, C, H, W); `folds` gives each image's fold (default 0)."""
        values = positional_values(features)
        folds = [0] * len(values) if folds is None else list(folds)
        self.spill_values(values)
        self.moments.add(values, features.shape[-2:], folds)

    def spill_values(self, values: torch.Tensor) -> None:
        """Append float32 values (b, P, C) to the spill, in the order their images were added."""
        with self.spill_path.open("ab") as spill:
            values.numpy().tofile(spill)

    def add_moments(self, moments: Moments) -> None:
        """Merge the moments of the images that follow, accumulated elsewhere (their values spilled apart)."""
        self.moments.merge(moments)

    def finish(self, reduction: Reduction, variance: float, exclude_fold: int | None = None) -> Gaussian:
        """The Gaussian of all images (or all outside one fold): moments plus one read of the spill."""
        return self.finish_many(reduction, variance, [exclude_fold])[0]

    def finish_many(
        self,
        reduction: Reduction,
        variance: float,
        exclude_folds: Sequence[int | None],
        release: bool = False,
        fold_dtype: type = np.float64,
    ) -> list[Gaussian]:
        """One Gaussian per entry of `exclude_folds` (None: all images; f: all outside fold f), with a single
        read of the spill for all their fourth moments: the full model and its fold models cost one pass, not
        one each (per position, each fold's outer sums are read back too). `release` frees the accumulated
        sums as they are used: the accumulator then serves only `fold_batches`. `fold_dtype` stores the fold
        models (which only score held-out images, in float32) in that precision; they are fitted in float64
        all the same."""
        if self.moments.shift is None:
            raise ValueError("no features were accumulated")
        cases = [self._case(reduction, variance, exclude) for exclude in exclude_folds]
        quartics = self._quartic_sums(
            [case.mean for case in cases], [case.projection for case in cases], exclude_folds
        )
        gaussians: list[Gaussian | None] = [None] * len(cases)
        order = sorted(range(len(cases)), key=lambda index: cases[index].exclude_fold is None)
        for index in order:  # all images last: with `release`, their sums are then used in place
            case = cases[index]
            covariance = (
                self._position_covariance(case, release) if self.per_position else case.shared_covariance
            )
            if not is_identity(case.projection):
                covariance = case.projection.T @ covariance @ case.projection
            gaussian = gaussian_from_moments(
                case.count,
                case.mean,
                covariance,
                quartics[index],
                case.projection,
                case.variance_scale,
                overwrite=self.per_position,
            )
            del covariance
            gaussians[index] = gaussian if case.exclude_fold is None else gaussian.astype(fold_dtype)
        if release:
            self.moments.release()
        return gaussians

    def _case(self, reduction: Reduction, variance: float, exclude_fold: int | None) -> _Case:
        """Count, mean and projection of the images outside `exclude_fold`, from the accumulated sums."""
        keep = [fold for fold in range(self.n_folds) if fold != exclude_fold]
        n_images = sum(1 for fold in self.folds if fold != exclude_fold)
        if n_images < 2:
            raise ValueError("fewer than 2 images outside the held-out fold")
        positions = self.grid[0] * self.grid[1]
        n_values = n_images * positions  # feature vectors, over all positions
        total = self.moments.sums[keep].sum(dim=0).numpy()
        shared_mean = (total.sum(axis=0) if self.per_position else total) / n_values
        shared_outer = self.moments.outer[keep].sum(dim=0).numpy() / n_values
        shared_covariance = shared_outer - np.outer(shared_mean, shared_mean)
        projection = fit_projection(shared_covariance, reduction, variance)
        scale = float(np.trace(projection.T @ shared_covariance @ projection)) / projection.shape[1]
        # Per position, each position's mean from the images: n_images samples; shared, all vectors.
        count, shifted_mean = (n_images, total / n_images) if self.per_position else (n_values, shared_mean)
        mean = self.moments.shift.numpy() + shifted_mean
        return _Case(exclude_fold, count, mean, shifted_mean, projection, scale, shared_covariance)

    def _position_covariance(self, case: _Case, release: bool) -> np.ndarray:
        """Per position, the covariance (P, C, C) of a case's images from the outer sums S of all images:
        (S - F) / n - m m^T, where F, the excluded fold's outer sums, is subtracted batch by batch as its
        features are read back from the spill (memory does not grow with the fold). With `release`, the
        case of all images (the last) is built in place over the sums themselves."""
        mean = torch.from_numpy(case.shifted_mean)[:, None, :]  # (P, 1, C)
        outer = self.moments.position_outer
        if case.exclude_fold is None and release:
            covariance = outer.baddbmm_(mean.transpose(1, 2), mean, beta=1 / case.count, alpha=-1)
        else:
            covariance = torch.baddbmm(outer, mean.transpose(1, 2), mean, beta=1 / case.count, alpha=-1)
        if case.exclude_fold is not None:
            for values in self._fold_chunks(case.exclude_fold):
                rows = torch.from_numpy(values).to(torch.float64).sub_(self.moments.shift).transpose(0, 1)
                covariance.baddbmm_(rows.transpose(1, 2), rows, alpha=-1 / case.count)
        return covariance.numpy()

    def _chunks(
        self, start: int = 0, stop: int | None = None, images_per_chunk: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(index of first image, float32 features (b, P, C)) of images start..stop-1, read back from the
        spill in order, `images_per_chunk` at a time (default: 4 MiB); the file is read from the first of
        them, not from its beginning."""
        stop = len(self.folds) if stop is None else stop
        positions = self.grid[0] * self.grid[1]
        per_image = int(self.moments.shift.numel()) * positions
        images_per_chunk = images_per_chunk or max(1, _READ_CHUNK_VALUES // per_image)
        with self.spill_path.open("rb") as spill:
            spill.seek(start * per_image * np.dtype(np.float32).itemsize)
            for first in range(start, stop, images_per_chunk):
                count = min(images_per_chunk, stop - first)
                chunk = np.fromfile(spill, dtype=np.float32, count=count * per_image)
                yield first, chunk.reshape(count, positions, -1)

    def _fold_chunks(self, fold: int, images_per_chunk: int | None = None) -> Iterator[np.ndarray]:
        """Float32 features (b, P, C) of one fold's images in order, reading only their runs of the spill
        (a fold is one run when folds are contiguous), `images_per_chunk` at a time (default: 4 MiB)."""
        members = np.flatnonzero(np.array(self.folds) == fold)
        for run in np.split(members, np.flatnonzero(np.diff(members) != 1) + 1):
            if run.size:
                chunks = self._chunks(int(run[0]), int(run[-1]) + 1, images_per_chunk)
                yield from (values for _, values in chunks)

    def _quartic_sums(
        self,
        means: Sequence[np.ndarray],
        projections: Sequence[np.ndarray],
        exclude_folds: Sequence[int | None],
    ) -> list[np.ndarray]:
        """Per case, the sum over its training samples of ||(x - mean) @ projection||^4, in one spill read.

        The projections sit side by side, so each chunk takes one GEMM for every case:
        (x - m) @ P = x @ P - m @ P, and one more product sums each case's squared coordinates. Cases that
        share one projection (all fold models of "none", where it is the identity) apply it once, and
        ||r - o||^2 = ||r||^2 - 2 r.o + ||o||^2 then gives every case's squared norm from one small product.
        """
        folds = np.array(self.folds)
        widths = [projection.shape[1] for projection in projections]
        same_projection = all(np.array_equal(projection, projections[0]) for projection in projections)
        stacked = projections[0] if same_projection else np.concatenate(projections, axis=1)  # (C, sum of d)
        project = not (same_projection and is_identity(stacked))
        offsets = np.concatenate(
            [mean @ projection for mean, projection in zip(means, projections, strict=True)], axis=-1
        )
        if same_projection:
            case_offsets = np.stack(np.split(offsets, len(widths), axis=-1), axis=-1)  # ([P,] d, cases)
            offset_norms = np.sum(case_offsets**2, axis=-2)  # ([P,] cases)
        case_of_column = np.repeat(np.arange(len(widths)), widths)
        summing = (case_of_column[:, None] == np.arange(len(widths))).astype(np.float64)  # (sum of d, cases)
        positions = self.grid[0] * self.grid[1]
        quartics = np.zeros((len(widths), positions if self.per_position else 1))
        product_bytes_per_image = np.dtype(np.float64).itemsize * positions * stacked.shape[1]
        for start, values in self._chunks(
            images_per_chunk=max(1, _QUARTIC_BLOCK_BYTES // product_bytes_per_image)
        ):
            batch = len(values)
            reduced = values.reshape(-1, values.shape[-1]).astype(np.float64)
            if project:
                reduced = reduced @ stacked
            reduced = reduced.reshape(batch, positions, -1)
            if same_projection:
                cross = (reduced.swapaxes(0, 1) @ case_offsets).swapaxes(0, 1)  # (b, P, cases)
                squared = np.sum(reduced**2, axis=-1)[..., None] - 2.0 * cross + offset_norms
            else:  # in place: each temporary of this size is 4 bytes per input value and projected width
                reduced -= offsets  # offsets: (sum of d) or (P, sum of d)
                squared = np.square(reduced, out=reduced) @ summing
            chunk_folds = folds[start : start + batch]
            for case, exclude in enumerate(exclude_folds):
                kept = squared[chunk_folds != exclude, :, case] ** 2  # (b', P)
                quartics[case] += kept.sum(axis=0) if self.per_position else kept.sum()
        return [quartic if self.per_position else quartic[0] for quartic in quartics]

    def fold_batches(self, fold: int, batch_size: int) -> Iterator[torch.Tensor]:
        """The spilled feature maps (b, C, H, W) of one fold's images in the order they were added,
        `batch_size` images at a time (a fold's run of the spill at a time where folds interleave)."""
        for values in self._fold_chunks(fold, batch_size):
            yield torch.from_numpy(values).permute(0, 2, 1).reshape(len(values), -1, *self.grid)


def positional_values(features: torch.Tensor) -> torch.Tensor:
    """Feature maps (B, C, H, W) as float32 feature vectors (B, H*W, C) on the CPU: moments' and spill's
    layout."""
    batch, channels = features.shape[:2]
    return features.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).reshape(batch, -1, channels)
