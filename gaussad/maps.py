"""Anomaly maps: per-position Mahalanobis distances, combined over levels, smoothed and resized."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

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


def combine_levels(level_maps: Sequence[torch.Tensor], size: int, blur_sigma: float) -> torch.Tensor:
    """Mean over levels of the maps (B, h, w) bilinearly upsampled to the model input (B, size, size), then
    blurred (sigma in input pixels; 0 turns it off).

    Upsampling and blur are separable and linear, so a level's map m becomes R @ m @ C.T with one (size, h)
    and one (size, w) matrix; stacking the levels side by side makes the sum over levels one batched GEMM.
    Measured for levels 3-5 at 224 px, batch 32, 2 threads: 0.13 ms per image, against 3.3 ms for
    interpolating each level to full size and blurring with two 1-D convolutions.
    """
    lefts, rights = [], []
    for level_map in level_maps:
        height, width = level_map.shape[-2:]
        rows = resampling_matrix(height, size, blur_sigma, level_map.dtype, level_map.device)
        columns = resampling_matrix(width, size, blur_sigma, level_map.dtype, level_map.device)
        lefts.append(rows @ level_map)  # (B, size, w)
        rights.append(columns)
    return torch.cat(lefts, dim=-1) @ torch.cat(rights, dim=-1).T / len(level_maps)


def combine_maps(
    level_maps: Sequence[torch.Tensor], position_map: torch.Tensor | None, size: int, blur_sigma: float
) -> torch.Tensor:
    """The anomaly maps (B, size, size): `combine_levels` of the level maps and, for hybrid maps, its
    geometric mean with the position map upsampled and blurred the same way. The shared Gaussians' map knows
    what a normal patch looks like anywhere, the per-position Gaussian's what belongs where; a position
    scores high only where both find it unusual (README, "How the defaults were chosen")."""
    combined = combine_levels(level_maps, size, blur_sigma)
    if position_map is None:
        return combined
    return torch.sqrt(combined * combine_levels([position_map], size, blur_sigma))


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
