"""Anomaly maps: per-position Mahalanobis distances, the resampling and blur matrices that combine levels
(`gaussad.scorer.MapHead`), and the final resize to an image's own size."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from gaussad.gaussian import mahalanobis


def level_distance_map(features: torch.Tensor, mean: torch.Tensor, whitening: torch.Tensor) -> torch.Tensor:
    """Distance at every position of feature maps (B, C, H, W) -> (B, H, W), as one (batched) product."""
    batch, channels, height, width = features.shape
    if whitening.ndim == 2:  # one Gaussian shared by all positions
        return mahalanobis(features.permute(0, 2, 3, 1), mean, whitening)
    per_position = features.flatten(2).permute(2, 0, 1)  # (P, B, C)
    return mahalanobis(per_position, mean, whitening).T.reshape(batch, height, width)


MAP_SCORE_SHARE = 0.01  # the map-based image score: the mean of the map's top 1% of values


def top_count(n_values: int, share: float = MAP_SCORE_SHARE) -> int:
    """How many of a map's `n_values` values its top `share` holds (at least one)."""
    return max(1, round(share * n_values))


def top_share_mean(maps: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Per map (B, H, W), the mean of its `count` highest values (default: its top `MAP_SCORE_SHARE`): an
    image score that does not care where in the image the anomaly is, and is steadier than the maximum.
    An exported graph passes the count, fixed by the input size, as a number rather than from a shape."""
    values = maps.flatten(1)
    count = top_count(maps.shape[-2] * maps.shape[-1]) if count is None else count
    return torch.topk(values, count, dim=1, sorted=False).values.mean(dim=1)


def combine_levels(
    level_maps: Sequence[torch.Tensor], rows: Sequence[torch.Tensor], columns: torch.Tensor
) -> torch.Tensor:
    """Mean over levels of the maps (B, h, w) resampled to (B, H, W): level i's map m becomes R_i @ m @ C_i.T,
    with rows[i] = R_i (H, h_i) and `columns` the C_i (W, w_i) side by side, so that the sum over levels is
    one batched product. Upsampling and blur are separable and linear: `resampling_matrix` gives both."""
    lefts = [level_rows @ level_map for level_rows, level_map in zip(rows, level_maps, strict=True)]
    return torch.cat(lefts, dim=-1) @ columns.T / len(level_maps)


def combine_maps(
    level_maps: Sequence[torch.Tensor],
    position_map: torch.Tensor | None,
    size: tuple[int, int],
    blur_sigma: float,
) -> torch.Tensor:
    """The anomaly maps (B, height, width) at `size` of level maps and, for hybrid maps, a position map, as
    `gaussad.scorer.MapHead` combines them, for any levels and blur (tuning and ablations)."""

    def rows(m: torch.Tensor) -> torch.Tensor:
        return resampling_matrix(m.shape[-2], size[0], blur_sigma, m.dtype, m.device)

    def columns(m: torch.Tensor) -> torch.Tensor:
        return resampling_matrix(m.shape[-1], size[1], blur_sigma, m.dtype, m.device)

    combined = combine_levels(
        level_maps, [rows(m) for m in level_maps], torch.cat([columns(m) for m in level_maps], -1)
    )
    if position_map is None:
        return combined
    return torch.sqrt(combined * combine_levels([position_map], [rows(position_map)], columns(position_map)))


@lru_cache(maxsize=64)
def resampling_matrix(
    cells: int, size: int, blur_sigma: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """(size, cells): 1-D bilinear upsampling (align_corners=False, as F.interpolate) then the blur."""
    # Row j: the unit map of cell j, upsampled (and blurred); as columns, they form the matrix.
    basis = torch.eye(cells, dtype=torch.float64)[:, None, :, None]  # (cells, 1, cells, 1)
    upsampled = F.interpolate(basis, size=(size, 1), mode="bilinear", align_corners=False)[:, 0, :, 0]
    if blur_sigma > 0:
        upsampled = blur_last_axis(upsampled, blur_sigma)
    return upsampled.T.to(device=device, dtype=dtype).contiguous()


def blur_last_axis(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """1-D Gaussian blur along the last axis of (N, L) values, reflecting at the ends, cut at 4 sigma."""
    radius = min(math.ceil(4.0 * sigma), values.shape[-1] - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=values.dtype, device=values.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    padded = F.pad(values[:, None], (radius, radius), mode="reflect")
    return F.conv1d(padded, (kernel / kernel.sum()).view(1, 1, -1))[:, 0]


def resize_map(anomaly_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of one (h, w) map to (height, width)."""
    if tuple(anomaly_map.shape) == tuple(size):
        return anomaly_map
    return F.interpolate(anomaly_map[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def resized_array(anomaly_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """`resize_map`, as a numpy array on the CPU: what prediction hands out."""
    return resize_map(anomaly_map, size).cpu().numpy()
