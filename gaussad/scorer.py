"""The fitted model as one `torch.nn.Module`: normalized images in, image scores and anomaly maps out.

`Scorer` holds the frozen backbone and, as float32 buffers, every fitted mean and whitening matrix, the
pooling of the image score, the maps' resampling and blur, and the hybrid mix. Prediction, evaluation and
the fit's held-out calibration all score through it (the calibration through its `MapHead` alone, on
features kept from the fit), so scoring is written once. Every operation is a matrix product or an
element-wise op, so the module exports to ONNX as it is. Decoding, resizing each map to its image's own
size and decisions stay outside.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from gaussad.backbones import TappedBackbone
from gaussad.features import pooling_matrix, stack_levels
from gaussad.gaussian import Gaussian, component_distance
from gaussad.maps import combine_levels, level_distance_map, resampling_matrix, top_count, top_share_mean
from gaussad.mixture import GaussianMixture, mixture_distance_map

Grid = tuple[int, int]
Score = TypeVar("Score", torch.Tensor, np.ndarray)


class LevelFeatures(nn.Module):
    """The frozen backbone's float32 feature maps (B, C, H, W) at the levels a model reads, in order."""

    def __init__(self, backbone: TappedBackbone, levels: Sequence[int], precision: str = "fp32") -> None:
        super().__init__()
        self.backbone = backbone
        self.levels = tuple(levels)
        self.precision = precision

    def forward(self, batch: torch.Tensor) -> list[torch.Tensor]:
        autocast = (
            torch.autocast(batch.device.type, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else nullcontext()
        )
        with autocast:
            outputs = self.backbone(batch, self.levels)
        return [output.float() for output in outputs]

    def grids(self, input_size: tuple[int, int]) -> dict[int, Grid]:
        """Each level's feature grid (height, width) at an input of `input_size` (height, width), from one
        probe."""
        device = next(self.backbone.parameters()).device
        with torch.inference_mode():
            outputs = self.backbone(torch.zeros(1, 3, *input_size, device=device), self.levels)
        return {level: tuple(output.shape[-2:]) for level, output in zip(self.levels, outputs, strict=True)}


def _gaussian_buffers(module: nn.Module, prefix: str, gaussian: Gaussian) -> None:
    mean, whitening = gaussian.to_torch("cpu")
    module.register_buffer(f"{prefix}_mean", mean)
    module.register_buffer(f"{prefix}_whitening", whitening)


class ImageHead(nn.Module):
    """Image score parts: per level, the component distance of the grid-pooled features (B, levels)."""

    def __init__(self, gaussians: Sequence[Gaussian], grids: Sequence[Grid], image_grid: int) -> None:
        super().__init__()
        self.n_levels = len(gaussians)
        self.image_grid = image_grid
        for index, (gaussian, (height, width)) in enumerate(zip(gaussians, grids, strict=True)):
            _gaussian_buffers(self, f"level{index}", gaussian)
            if image_grid > 1:
                self.register_buffer(f"level{index}_rows", pooling_matrix(height, image_grid).float())
                self.register_buffer(f"level{index}_columns", pooling_matrix(width, image_grid).float())

    def pool(self, index: int, features: torch.Tensor) -> torch.Tensor:
        """One level's image descriptor, as `features.pool_features` computes it (cells per channel)."""
        if self.image_grid == 1:
            return features.mean(dim=(2, 3))
        rows, columns = getattr(self, f"level{index}_rows"), getattr(self, f"level{index}_columns")
        return (rows @ features @ columns.T).flatten(1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        distances = [
            component_distance(
                self.pool(index, level_features),
                getattr(self, f"level{index}_mean"),
                getattr(self, f"level{index}_whitening"),
            )
            for index, level_features in enumerate(features)
        ]
        return torch.stack(distances, dim=1)


class MapHead(nn.Module):
    """Anomaly maps (B, H, W) at the model input size from positional features.

    The mean over map levels of each level's distance map, bilinearly upsampled and blurred; for hybrid
    maps, its geometric mean with the per-position Gaussian's map of the stacked position levels, upsampled
    and blurred the same way. The shared Gaussians know what a normal patch looks like anywhere, the
    per-position one what belongs where: a position scores high only where both find it unusual.
    Upsampling and blur are separable and linear, so a level's map m becomes R @ m @ C.T with one (H, h)
    and one (W, w) matrix, and levels side by side make the sum over levels one batched product.
    A level's Gaussian may be a `GaussianMixture` (the hybrid map's shared half): its map is then each
    position's smallest distance to the mixture's Gaussians.
    The head holds a Gaussian per level of `gaussians`; the anomaly map is made of those at `map_indices`,
    the score map (whose top share is the image score's map part) of those at `score_indices`; both
    default to all of them.
    """

    def __init__(
        self,
        gaussians: Sequence[Gaussian],
        grids: Sequence[Grid],
        position_gaussian: Gaussian | None,
        position_grid: Grid | None,
        input_size: tuple[int, int],
        blur_sigma: float,
        map_indices: Sequence[int] | None = None,
        score_indices: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.map_indices = list(range(len(gaussians)) if map_indices is None else map_indices)
        self.score_indices = self.map_indices if score_indices is None else list(score_indices)
        self.input_size = input_size
        self.hybrid = position_gaussian is not None
        self.position_grid = position_grid
        self.mixtures = [isinstance(gaussian, GaussianMixture) for gaussian in gaussians]

        def resampling(cells: int, size: int) -> torch.Tensor:
            return resampling_matrix(cells, size, blur_sigma, torch.float32, torch.device("cpu")).clone()

        map_height, map_width = input_size
        for index, (gaussian, (height, _)) in enumerate(zip(gaussians, grids, strict=True)):
            _gaussian_buffers(self, f"level{index}", gaussian)
            self.register_buffer(f"level{index}_rows", resampling(height, map_height))
        columns = [resampling(width, map_width) for _, width in grids]
        self.register_buffer("columns", torch.cat([columns[i] for i in self.map_indices], dim=-1))
        if self.score_indices != self.map_indices:
            self.register_buffer("score_columns", torch.cat([columns[i] for i in self.score_indices], dim=-1))
        if position_gaussian is not None and position_grid is not None:
            _gaussian_buffers(self, "position", position_gaussian)
            self.register_buffer("position_rows", resampling(position_grid[0], map_height))
            self.register_buffer("position_columns", resampling(position_grid[1], map_width))

    def level_maps(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each map level's distance map (B, h, w) on its own grid."""
        return [
            (mixture_distance_map if mixture else level_distance_map)(
                level_features, getattr(self, f"level{i}_mean"), getattr(self, f"level{i}_whitening")
            )
            for i, (level_features, mixture) in enumerate(zip(features, self.mixtures, strict=True))
        ]

    def position_map(self, stacked: torch.Tensor) -> torch.Tensor:
        """The per-position Gaussian's distance map (B, h, w) of stacked position features."""
        return level_distance_map(stacked, self.position_mean, self.position_whitening)

    def maps(
        self, level_maps: Sequence[torch.Tensor], position_map: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The anomaly maps and the score maps (B, H, W) from every level's map and, for hybrid maps, the
        position map (resampled once for both); the score maps are the anomaly maps where both have the
        same levels."""
        position = None
        if position_map is not None:
            position = combine_levels([position_map], [self.position_rows], self.position_columns)
        anomaly_maps = self._mixed(level_maps, self.map_indices, self.columns, position)
        if self.score_indices == self.map_indices:
            return anomaly_maps, anomaly_maps
        return anomaly_maps, self._mixed(level_maps, self.score_indices, self.score_columns, position)

    def _mixed(
        self,
        level_maps: Sequence[torch.Tensor],
        indices: Sequence[int],
        columns: torch.Tensor,
        position: torch.Tensor | None,
    ) -> torch.Tensor:
        """The mean map of the levels at `indices`, and for hybrid maps its geometric mean with the
        resampled position map."""
        rows = [getattr(self, f"level{i}_rows") for i in indices]
        combined = combine_levels([level_maps[i] for i in indices], rows, columns)
        return combined if position is None else torch.sqrt(combined * position)

    def forward(
        self, features: Sequence[torch.Tensor], stacked: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps and score maps from every level's features and, for hybrid maps, the stacked
        position features."""
        return self.maps(self.level_maps(features), self.position_map(stacked) if self.hybrid else None)


class Scorer(nn.Module):
    """Normalized images (B, 3, H, W) -> image scores (B,) and anomaly maps (B, H, W) at the input size.

    The image score is, by `image_score`: "pooled", the sum over image levels of the component distances
    of grid-pooled features; "map", the mean of the score map's top 1%; "combined", the two and, with a
    `global_head`, the sum over its levels of the distances of features pooled over the whole image, each
    divided by its spread over normal images (`score_scales`) and summed. Both maps are `MapHead`'s, from
    the features at `map_levels` (every level with a map Gaussian: the anomaly map's and the score map's);
    `with_maps=False` leaves the maps out (computing them only when the score needs them).
    """

    def __init__(
        self,
        features: LevelFeatures,
        levels: Sequence[int],
        map_levels: Sequence[int],
        position_levels: Sequence[int],
        image_head: ImageHead,
        map_head: MapHead,
        image_score: str = "pooled",
        score_scales: Sequence[float] = (1.0, 1.0),
        global_levels: Sequence[int] = (),
        global_head: ImageHead | None = None,
    ) -> None:
        super().__init__()
        self.image_score = image_score
        self.top_count = top_count(map_head.input_size[0] * map_head.input_size[1])
        self.register_buffer("score_scales", torch.tensor(score_scales, dtype=torch.float32))
        self.features = features
        index = {level: i for i, level in enumerate(features.levels)}
        self.image_indices = [index[level] for level in levels]
        self.map_indices = [index[level] for level in map_levels]
        self.position_indices = [index[level] for level in position_levels]
        self.global_indices = [index[level] for level in global_levels]
        self.image_head = image_head
        self.map_head = map_head
        self.global_head = global_head

    def forward(self, batch: torch.Tensor, with_maps: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        return self.score(self.features(batch), with_maps)

    def score(
        self, features: Sequence[torch.Tensor], with_maps: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps from the backbone's features at `features.levels` (maps (B, 0, 0) without)."""
        pooled = self.image_head([features[i] for i in self.image_indices]).sum(dim=1)
        if not with_maps and self.image_score == "pooled":
            return pooled, pooled.new_empty((len(pooled), 0, 0))
        stacked = self.stack_position([features[i] for i in self.position_indices])
        maps, score_maps = self.map_head([features[i] for i in self.map_indices], stacked)
        whole = None
        if self.global_head is not None:
            whole = self.global_head([features[i] for i in self.global_indices]).sum(dim=1)
        scores = image_scores(self.image_score, pooled, score_maps, self.score_scales, self.top_count, whole)
        return scores, maps if with_maps else maps.new_empty((len(maps), 0, 0))

    def stack_position(self, features: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The hybrid map's per-position input: the position levels side by side (None for other maps)."""
        return stack_levels(features) if features else None


def image_scores(
    kind: str,
    pooled: torch.Tensor,
    maps: torch.Tensor,
    scales: torch.Tensor | Sequence[float],
    count: int | None = None,
    whole: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image scores (B,) of one kind from pooled scores (B,), anomaly maps (B, H, W) and, for a combined
    score with three parts, global scores (B,) (see `Scorer`); `count` values make the map's top share."""
    if kind == "pooled":
        return pooled
    if kind == "map":
        return top_share_mean(maps, count)
    return combined_scores(pooled, top_share_mean(maps, count), scales, whole)


def combined_scores(
    pooled: Score, tops: Score, scales: torch.Tensor | Sequence[float], whole: Score | None = None
) -> Score:
    """The combined image score from pooled scores, the maps' top-share means and, if given, global scores
    (tensors or arrays): each divided by its scale (its spread over held-out normal images), then summed."""
    combined = pooled / scales[0] + tops / scales[1]
    return combined if whole is None else combined + whole / scales[2]
