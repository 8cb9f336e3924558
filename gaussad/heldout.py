"""Held-out maps: each training image's anomaly map under the map models fitted without its fold, reduced to
what label-free calibration and `auto` need (maximum, median, mean of the top share) per candidate
localization. Scored by the same `MapHead` as predictions, a batch at a time, wherever the features are:
in the fitting process (from the feature store, or the backbone again) or on a cluster's workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from gaussad.features import stack_levels
from gaussad.gaussian import Gaussian
from gaussad.maps import top_share_mean
from gaussad.scorer import Grid, MapHead
from gaussad.state import FittedState

# Held-out images a batch at a time, each batch within one fold: (its fold, the map levels' feature maps,
# the stacked position levels' or None without them).
FoldBatches = Iterable[tuple[int, list[torch.Tensor], torch.Tensor | None]]


@dataclass
class HeldOutMaps:
    """Per training image, under the map models fitted without its fold: its anomaly map's maximum and
    median, and its score map's mean of the top share (the map-based image score)."""

    maxima: np.ndarray
    medians: np.ndarray
    tops: np.ndarray

    @classmethod
    def empty(cls, n_images: int) -> HeldOutMaps:
        return cls(np.zeros(n_images), np.zeros(n_images), np.zeros(n_images))

    def record(self, rows: np.ndarray, maps: torch.Tensor, score_maps: torch.Tensor) -> None:
        flat = maps.flatten(1)
        self.maxima[rows] = flat.amax(dim=1).cpu().numpy()
        self.medians[rows] = flat.median(dim=1).values.cpu().numpy()
        self.tops[rows] = top_share_mean(score_maps).cpu().numpy()

    def place(self, start: int, other: HeldOutMaps) -> None:
        """Take the values of images start.. from `other` (a shard's)."""
        stop = start + len(other.maxima)
        self.maxima[start:stop], self.medians[start:stop], self.tops[start:stop] = (
            other.maxima,
            other.medians,
            other.tops,
        )


def position_grid(state: FittedState, grids: dict[int, Grid]) -> Grid | None:
    """The coarsest grid of the position levels: where their stacked features sit (None without them)."""
    if not state.position_levels:
        return None
    return min((grids[level] for level in state.position_levels), key=lambda grid: grid[0] * grid[1])


def map_head(
    gaussians: Sequence[Gaussian],
    position: Gaussian | None,
    state: FittedState,
    grids: dict[int, Grid],
    blur_sigma: float,
) -> MapHead:
    """The map head of these Gaussians (the model's own, or a fold model's, one per level of
    `state.map_gaussian_levels`) for the model's anomaly map and score map."""
    levels = state.map_gaussian_levels
    return MapHead(
        gaussians,
        [grids[level] for level in levels],
        position,
        position_grid(state, grids),
        state.input_size,
        blur_sigma,
        [levels.index(level) for level in state.map_levels],
        [levels.index(level) for level in state.score_map_levels or state.map_levels],
    )


@dataclass
class FoldHeads:
    """The fold models' map heads, built when a fold is first asked for; one fold's are held at a time
    (each holds float32 copies of its Gaussians). fold_map_gaussians[i][fold] is map level i's Gaussian
    fitted without that fold; fold_position the position Gaussians by fold (hybrid maps); fold_mixtures[i]
    map level i's mixtures by fold, which take its place in hybrid maps."""

    state: FittedState
    grids: dict[int, Grid]
    blur_sigma: float
    fold_map_gaussians: list[list[Gaussian]]
    fold_position: list[Gaussian] | None
    device: torch.device | str = "cpu"
    fold_mixtures: dict[int, list[Gaussian]] = field(default_factory=dict)
    _held: tuple[int, dict[bool, MapHead]] | None = field(default=None, repr=False)

    def head(self, fold: int, hybrid: bool = False) -> MapHead:
        """A fold's map head: the shared one, or with `hybrid` the one with its position Gaussian and
        mixtures."""
        if self._held is None or self._held[0] != fold:
            self._held = (fold, {})  # the last fold's heads go before the next is built
        heads = self._held[1]
        if hybrid not in heads:
            gaussians = [
                self.fold_mixtures[index][fold] if hybrid and index in self.fold_mixtures else by_fold[fold]
                for index, by_fold in enumerate(self.fold_map_gaussians)
            ]
            position = self.fold_position[fold] if hybrid and self.fold_position else None
            head = map_head(gaussians, position, self.state, self.grids, self.blur_sigma)
            heads[hybrid] = head.to(self.device)
        return heads[hybrid]

    def maps(
        self,
        fold: int,
        level_features: Sequence[torch.Tensor],
        stacked: torch.Tensor | None,
        localizations: Sequence[str],
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Anomaly maps and score maps (B, H, W) per candidate localization of images in `fold` under that
        fold's models: "hybrid" mixes in the position map, any other name (shared, per-position) is the
        level maps alone."""
        features = [values.to(self.device) for values in level_features]
        level_maps: dict[bool, list[torch.Tensor]] = {}  # by whether they are the mixtures'
        found = {}
        for name in localizations:
            hybrid = name == "hybrid" and stacked is not None and bool(self.fold_position)
            head = self.head(fold, hybrid)
            mixed = hybrid and bool(self.fold_mixtures)
            if mixed not in level_maps:
                level_maps[mixed] = head.level_maps(features)
            position_map = head.position_map(stacked.to(self.device)) if hybrid else None
            found[name] = head.maps(level_maps[mixed], position_map)
        return found


def level_inputs(
    by_level: dict[int, torch.Tensor], map_levels: Sequence[int], position_levels: Sequence[int]
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """What a map head takes from feature maps by level: the map levels' and the position levels' stacked
    (None without position levels)."""
    stacked = stack_levels([by_level[level] for level in position_levels]) if position_levels else None
    return [by_level[level] for level in map_levels], stacked


def held_out_maps(
    heads: FoldHeads, localization: str, fold_of: np.ndarray, batches: FoldBatches
) -> HeldOutMaps:
    """Every image's held-out maps with the `localization` (the chosen one); `fold_of` gives each image's
    fold, `batches` their features in order, a batch at a time: a whole fold's features or full-size maps
    would make the fit's peak memory grow with the training images."""
    results = HeldOutMaps.empty(len(fold_of))
    rows = {fold: np.flatnonzero(fold_of == fold) for fold in np.unique(fold_of).tolist()}
    taken = dict.fromkeys(rows, 0)  # per fold, its images recorded so far
    for fold, level_features, stacked in batches:
        count = len(level_features[0])
        at = rows[fold][taken[fold] : taken[fold] + count]
        taken[fold] += count
        maps, score_maps = heads.maps(fold, level_features, stacked, [localization])[localization]
        results.record(at, maps, score_maps)
    return results
