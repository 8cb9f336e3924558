"""Mergeable float64 moments of one level's feature vectors: what a level's Gaussian needs from each image.

Per fold of the training images: the count, the sum and the outer-product sum (over all positions); per
position, the sums and (for per-position Gaussians) the outer-product sums of all folds together. Moments
of disjoint sets of images merge into the moments of their union, so that shards of a training set can be
accumulated apart (threads, processes, cluster nodes) and combined. Sums are kept about a shift near the
mean (the first batch's), which avoids cancellation where the mean is large against the spread; a merge
moves the other's sums onto this shift exactly, in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def add_position_outer(outer: torch.Tensor, shifted: torch.Tensor, alpha: float = 1.0) -> None:
    """Add `alpha` times the per-position outer-product sums of float64 values (b, P, C) to `outer`
    (P, C, C), in place: the sums are large, and a temporary would triple the memory traffic."""
    by_position = shifted.transpose(0, 1)  # (P, b, C)
    outer.baddbmm_(by_position.transpose(1, 2), by_position, alpha=alpha)


class Moments:
    """Moments of feature vectors (b, P, C): P positions of C channels per image, each image in a fold.

    sums (folds, [P,] C) and outer (folds, C, C) are about `shift` (C,); position_outer (P, C, C), kept
    only `per_position`, sums all folds (one per fold would be five times the memory on the tiles).
    """

    def __init__(self, per_position: bool, n_folds: int = 1) -> None:
        self.per_position = per_position
        self.n_folds = n_folds
        self.folds: list[int] = []  # the fold of every image added, in order
        self.grid: tuple[int, int] | None = None
        self.shift: torch.Tensor | None = None
        self.sums: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None
        self.position_outer: torch.Tensor | None = None

    @property
    def channels(self) -> int:
        return int(self.shift.numel()) if self.shift is not None else 0

    def add(self, values: torch.Tensor, grid: tuple[int, int], folds: Sequence[int]) -> None:
        """Accumulate one batch: float32 values (b, P, C) on a grid of P = height x width positions."""
        self._check_grid(grid)
        batch, positions, channels = values.shape
        wide = values.to(torch.float64)
        if self.shift is None:
            self._start(wide.mean(dim=(0, 1)), positions)
        shifted = wide - self.shift
        if self.per_position:
            add_position_outer(self.position_outer, shifted)
        fold_index = torch.tensor(list(folds))
        for fold in fold_index.unique().tolist():
            members = shifted[fold_index == fold]
            self.sums[fold] += members.sum(dim=0) if self.per_position else members.sum(dim=(0, 1))
            flat = members.reshape(-1, channels)
            self.outer[fold].addmm_(flat.T, flat)
        self.folds += list(folds)

    def merge(self, other: Moments) -> Moments:
        """Add the moments of other images (added after this one's); returns self."""
        if other.shift is None:
            return self
        if (other.per_position, other.n_folds) != (self.per_position, self.n_folds):
            raise ValueError("moments of different kinds (per position, folds) do not merge")
        self._check_grid(other.grid)
        if self.shift is None:
            self._start(other.shift.clone(), other.grid[0] * other.grid[1])
        # Sums about other.shift = b moved onto self.shift = a, with d = b - a and n vectors:
        # sum(x - a) = sum(x - b) + n d;  sum (x-a)(x-a)^T = sum (x-b)(x-b)^T + d s^T + s d^T + n d d^T.
        delta = other.shift - self.shift
        positions = self.grid[0] * self.grid[1]
        images = torch.bincount(torch.tensor(other.folds, dtype=torch.long), minlength=self.n_folds)
        images = images.to(torch.float64)
        vectors = images if self.per_position else images * positions  # per fold, the vectors summed
        shape = (-1, 1, 1) if self.per_position else (-1, 1)
        moved_sums = other.sums + vectors.reshape(shape) * delta
        over_positions = other.sums.sum(dim=1) if self.per_position else other.sums  # (folds, C)
        count = (images * positions)[:, None, None]
        cross = delta[None, :, None] * over_positions[:, None, :]
        self.outer += other.outer + cross + cross.transpose(1, 2) + count * torch.outer(delta, delta)
        self.sums += moved_sums
        if self.per_position:
            all_sums = other.sums.sum(dim=0)  # (P, C), every fold
            position_cross = delta[None, :, None] * all_sums[:, None, :]
            self.position_outer += other.position_outer + position_cross + position_cross.transpose(1, 2)
            self.position_outer += float(len(other.folds)) * torch.outer(delta, delta)
        self.folds += other.folds
        return self

    def release(self) -> None:
        """Free the sums (the large part), keeping what locates the images' features: folds, grid, shift."""
        self.sums = self.outer = self.position_outer = None

    def _start(self, shift: torch.Tensor, positions: int) -> None:
        channels = shift.numel()
        self.shift = shift
        shape = (positions,) if self.per_position else ()
        self.sums = torch.zeros((self.n_folds, *shape, channels), dtype=torch.float64)
        self.outer = torch.zeros((self.n_folds, channels, channels), dtype=torch.float64)
        if self.per_position:
            self.position_outer = torch.zeros((positions, channels, channels), dtype=torch.float64)

    def _check_grid(self, grid: tuple[int, int]) -> None:
        if self.grid is None:
            self.grid = tuple(grid)
        elif self.grid != tuple(grid):
            raise ValueError(f"feature grid changed from {self.grid} to {tuple(grid)} within one fit")
