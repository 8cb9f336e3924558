"""Streaming the training feature maps of one level into its Gaussian.

Fitting must not hold every training feature map in memory. The first pass accumulates float64 moments
(`gaussad.moments.Moments`, mergeable across shards of the images) batch by batch and keeps the float32
features in a feature store (`gaussad.store`: a file on disk, or memory). Once the covariance (and so the
PCA) is known, one reading of every image's features in order (`Finishing`) gives the fourth-moment sum that
Ledoit-Wolf shrinkage needs in the reduced space: from the store, or from the backbone run again where no
store is kept. Per position, outer sums are kept for all images together, and those of a fold are read
back from the store when calibration needs the Gaussian without it (without a store, that same reading
sums each fold's). The result equals fitting on all features at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from gaussad.gaussian import Gaussian, Reduction, fit_projection, gaussian_from_moments, is_identity
from gaussad.moments import Moments, add_position_outer
from gaussad.store import FeatureStore

_READ_CHUNK_VALUES = 1 << 20  # float32 values per read of the store (4 MiB)
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
    """A level's `Moments` and its stored features: what one level's Gaussians are finished from.

    `add` takes feature maps (B, C, H, W); `finish` returns the level's Gaussian: a mean (C,) and whitening
    (C, d) when shared, a mean (H*W, C) and whitening (H*W, C, d) per position. Moments are kept per fold
    of the training images, so that `finish(exclude_fold=f)` gives the Gaussian of all other folds: what
    label-free calibration needs, without another pass of the backbone. Moments accumulated elsewhere (a
    shard of the images on another worker) join with `add_moments`, their features with `store_values`.
    Without a store (None), the Gaussians are finished from a `Finishing` fed with the features again.
    """

    def __init__(self, store: FeatureStore | None, per_position: bool, n_folds: int = 1) -> None:
        self.store = store
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
        self.add_values(positional_values(features), features.shape[-2:], folds)

    def add_values(
        self, values: torch.Tensor, grid: tuple[int, int], folds: Sequence[int] | None = None
    ) -> None:
        """Accumulate a batch's feature vectors (B, P, C; `positional_values`) on a grid of P positions."""
        folds = [0] * len(values) if folds is None else list(folds)
        self.store_values(values)
        self.moments.add(values, grid, folds)

    def store_values(self, values: torch.Tensor) -> None:
        """Keep float32 values (b, P, C) in the store (if any), in the order their images were added."""
        if self.store is not None:
            self.store.append(values.numpy())

    def add_moments(self, moments: Moments) -> None:
        """Merge the moments of the images that follow, accumulated elsewhere (their values stored apart)."""
        self.moments.merge(moments)

    def finish(self, reduction: Reduction, variance: float, exclude_fold: int | None = None) -> Gaussian:
        """The Gaussian of all images (or all outside one fold): moments plus one read of the store."""
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
        read of the store for all their fourth moments: the full model and its fold models cost one pass, not
        one each (see `finished` for `release` and `fold_dtype`)."""
        finishing = self.finishing(reduction, variance, exclude_folds)
        for start, values in self._chunks(images_per_chunk=finishing.images_per_chunk):
            finishing.add(start, values)
        return self.finished(finishing, release, fold_dtype)

    def finishing(
        self, reduction: Reduction, variance: float, exclude_folds: Sequence[int | None]
    ) -> Finishing:
        """What the Gaussians of `exclude_folds` still need, to be fed every image's features in order."""
        if self.moments.shift is None:
            raise ValueError("no features were accumulated")
        return Finishing(
            [self._case(reduction, variance, exclude) for exclude in exclude_folds],
            np.array(self.folds),
            self.per_position,
            self.grid[0] * self.grid[1],
            self.moments.shift,
            fold_sums=self.store is None and self.per_position,
        )

    def finished(
        self, finishing: Finishing, release: bool = False, fold_dtype: type = np.float64
    ) -> list[Gaussian]:
        """The Gaussians of `finishing`'s cases, in order, once it has every image's features. `release` frees
        the accumulated sums as they are used: the accumulator then serves only `fold_batches`. `fold_dtype`
        stores the fold models (which only score held-out images, in float32) in that precision; they are
        fitted in float64 all the same."""
        cases = finishing.cases
        gaussians: list[Gaussian | None] = [None] * len(cases)
        order = sorted(range(len(cases)), key=lambda index: cases[index].exclude_fold is None)
        for index in order:  # all images last: with `release`, their sums are then used in place
            case = cases[index]
            covariance = (
                self._position_covariance(case, release, finishing.fold_outer.pop(case.exclude_fold, None))
                if self.per_position
                else case.shared_covariance
            )
            if not is_identity(case.projection):
                covariance = case.projection.T @ covariance @ case.projection
            quartic = finishing.quartics[index] if self.per_position else finishing.quartics[index][0]
            gaussian = gaussian_from_moments(
                case.count,
                case.mean,
                covariance,
                quartic,
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

    def _position_covariance(
        self, case: _Case, release: bool, fold_outer: torch.Tensor | None = None
    ) -> np.ndarray:
        """Per position, the covariance (P, C, C) of a case's images from the outer sums S of all images:
        (S - F) / n - m m^T, where F, the excluded fold's outer sums, is given (`fold_outer`) or subtracted
        batch by batch as its features are read back from the store (memory does not grow with the fold).
        With `release`, the case of all images (the last) is built in place over the sums themselves."""
        mean = torch.from_numpy(case.shifted_mean)[:, None, :]  # (P, 1, C)
        outer = self.moments.position_outer
        if case.exclude_fold is None and release:
            covariance = outer.baddbmm_(mean.transpose(1, 2), mean, beta=1 / case.count, alpha=-1)
        else:
            covariance = torch.baddbmm(outer, mean.transpose(1, 2), mean, beta=1 / case.count, alpha=-1)
        if case.exclude_fold is not None and fold_outer is not None:
            covariance.add_(fold_outer, alpha=-1 / case.count)
        elif case.exclude_fold is not None:
            for values in self._fold_chunks(case.exclude_fold):
                shifted = torch.from_numpy(values).to(torch.float64).sub_(self.moments.shift)
                add_position_outer(covariance, shifted, alpha=-1 / case.count)
        return covariance.numpy()

    def _chunks(
        self, start: int = 0, stop: int | None = None, images_per_chunk: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(index of first image, float32 features (b, P, C)) of images start..stop-1, read back from the
        store in order, `images_per_chunk` at a time (default: 4 MiB)."""
        if self.store is None:
            raise ValueError("the features were not kept: the Gaussians finish from a `Finishing`")
        per_image = int(self.moments.shift.numel()) * self.grid[0] * self.grid[1]
        images_per_chunk = images_per_chunk or max(1, _READ_CHUNK_VALUES // per_image)
        yield from self.store.read(start, len(self.folds) if stop is None else stop, images_per_chunk)

    def _fold_chunks(self, fold: int, images_per_chunk: int | None = None) -> Iterator[np.ndarray]:
        """Float32 features (b, P, C) of one fold's images in order, reading only their runs of the store
        (a fold is one run when folds are contiguous), `images_per_chunk` at a time (default: 4 MiB)."""
        members = np.flatnonzero(np.array(self.folds) == fold)
        for run in np.split(members, np.flatnonzero(np.diff(members) != 1) + 1):
            if run.size:
                chunks = self._chunks(int(run[0]), int(run[-1]) + 1, images_per_chunk)
                yield from (values for _, values in chunks)

    def fold_batches(self, fold: int, batch_size: int) -> Iterator[torch.Tensor]:
        """The stored feature maps (b, C, H, W) of one fold's images in the order they were added,
        `batch_size` images at a time (a fold's run of the store at a time where folds interleave)."""
        for values in self._fold_chunks(fold, batch_size):
            yield torch.from_numpy(values).permute(0, 2, 1).reshape(len(values), -1, *self.grid)


class Finishing:
    """What a level's Gaussians (one per case: all images, or all outside one fold) still need once the
    moments are known, summed from one reading of every image's features in order (`add`): per case the
    fourth-moment sum ||(x - mean) @ projection||^4 that Ledoit-Wolf shrinkage needs, and, with
    `fold_sums` (per position, where no store can give them back), each excluded fold's per-position outer
    sums about `shift`. Sums over disjoint images add up (`add_sums`), so a finishing travels to the
    workers of a cluster as it is (`empty` gives a copy without sums) and their shards' sums join.

    The projections sit side by side, so each chunk takes one GEMM for every case:
    (x - m) @ P = x @ P - m @ P, and one more product sums each case's squared coordinates. Cases that
    share one projection (all fold models of "none", where it is the identity) apply it once, and
    ||r - o||^2 = ||r||^2 - 2 r.o + ||o||^2 then gives every case's squared norm from one small product.
    """

    def __init__(
        self,
        cases: Sequence[_Case],
        folds: np.ndarray,
        per_position: bool,
        positions: int,
        shift: torch.Tensor,
        fold_sums: bool,
    ) -> None:
        self.cases = list(cases)
        self.folds = folds  # each image's fold, in order
        self.per_position = per_position
        self.shift = shift
        self.fold_sums = fold_sums
        projections = [case.projection for case in cases]
        widths = [projection.shape[1] for projection in projections]
        self._same_projection = all(np.array_equal(p, projections[0]) for p in projections)
        self._stacked = projections[0] if self._same_projection else np.concatenate(projections, axis=1)
        self._project = not (self._same_projection and is_identity(self._stacked))
        self._offsets = np.concatenate([case.mean @ case.projection for case in cases], axis=-1)
        if self._same_projection:
            self._case_offsets = np.stack(np.split(self._offsets, len(widths), axis=-1), axis=-1)
            self._offset_norms = np.sum(self._case_offsets**2, axis=-2)  # ([P,] cases)
        case_of_column = np.repeat(np.arange(len(widths)), widths)
        self._summing = (case_of_column[:, None] == np.arange(len(widths))).astype(np.float64)
        self._positions = positions
        product_bytes_per_image = np.dtype(np.float64).itemsize * positions * self._stacked.shape[1]
        # Fewer images at a time than a read: the float64 products (rows x projected widths) stay in cache.
        self.images_per_chunk = max(1, _QUARTIC_BLOCK_BYTES // product_bytes_per_image)
        self._excluded = {case.exclude_fold for case in cases if case.exclude_fold is not None}
        self._clear()

    def _clear(self) -> None:
        self.quartics = np.zeros((len(self.cases), self._positions if self.per_position else 1))
        self.fold_outer: dict[int, torch.Tensor] = {}  # (P, C, C) per excluded fold met so far

    def empty(self) -> Finishing:
        """A copy without sums, for the features of other images."""
        copy = object.__new__(Finishing)
        copy.__dict__.update(self.__dict__)
        copy._clear()
        return copy

    def add_sums(self, quartics: np.ndarray, fold_outer: dict[int, torch.Tensor]) -> None:
        """Add the sums of other images (another's `quartics` and `fold_outer`)."""
        self.quartics += quartics
        for fold, outer in fold_outer.items():
            if fold in self.fold_outer:
                self.fold_outer[fold] += outer
            else:
                self.fold_outer[fold] = outer

    def add(self, start: int, values: np.ndarray) -> None:
        """Add the float32 features (b, P, C) of images start..start+b-1."""
        for offset in range(0, len(values), self.images_per_chunk):
            self._add_quartics(start + offset, values[offset : offset + self.images_per_chunk])
        if self.fold_sums:
            chunk_folds = self.folds[start : start + len(values)]
            shifted = torch.from_numpy(values).to(torch.float64).sub_(self.shift)
            for fold in self._excluded.intersection(chunk_folds.tolist()):
                if fold not in self.fold_outer:
                    _, positions, channels = shifted.shape
                    self.fold_outer[fold] = torch.zeros((positions, channels, channels), dtype=torch.float64)
                add_position_outer(self.fold_outer[fold], shifted[torch.from_numpy(chunk_folds == fold)])

    def _add_quartics(self, start: int, values: np.ndarray) -> None:
        batch = len(values)
        reduced = values.reshape(-1, values.shape[-1]).astype(np.float64)
        if self._project:
            reduced = reduced @ self._stacked
        reduced = reduced.reshape(batch, self._positions, -1)
        if self._same_projection:
            cross = (reduced.swapaxes(0, 1) @ self._case_offsets).swapaxes(0, 1)  # (b, P, cases)
            squared = np.sum(reduced**2, axis=-1)[..., None] - 2.0 * cross + self._offset_norms
        else:  # in place: each temporary of this size is 4 bytes per input value and projected width
            reduced -= self._offsets  # offsets: (sum of d) or (P, sum of d)
            squared = np.square(reduced, out=reduced) @ self._summing
        chunk_folds = self.folds[start : start + batch]
        for index, case in enumerate(self.cases):
            kept = squared[chunk_folds != case.exclude_fold, :, index] ** 2  # (b', P)
            self.quartics[index] += kept.sum(axis=0) if self.per_position else kept.sum()


def positional_values(features: torch.Tensor) -> torch.Tensor:
    """Feature maps (B, C, H, W) as float32 feature vectors (B, H*W, C) on the CPU: moments' and store's
    layout."""
    batch, channels = features.shape[:2]
    return features.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).reshape(batch, -1, channels)
