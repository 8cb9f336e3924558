"""Anomaly maps as pictures: a colour scale fixed over a whole run, so maps are comparable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

from gaussad.decisions import output_path
from gaussad.errors import GaussADError
from gaussad.images import DEFAULT_MAX_PIXELS, read_image

_LUT = (colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
_SQUARE = np.ones((3, 3), dtype=bool)


def colorize(anomaly_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """An (H, W) map as an (H, W, 3) uint8 image: `low` and below dark, `high` and above bright."""
    span = max(high - low, np.finfo(np.float32).eps)
    index = np.clip((anomaly_map - low) / span * 255.0, 0, 255).astype(np.uint8)
    return _LUT[index]


def outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a bool mask: 1 px inside its edge, gap-free; the image border closes it."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, structure=_SQUARE, border_value=0)


def draw_outline(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """A copy of an (H, W, 3) uint8 image with the outline of `mask` painted in `color`."""
    if mask.shape != image.shape[:2]:
        raise GaussADError(f"mask of shape {mask.shape} for an image of shape {image.shape}")
    drawn = image.copy()
    drawn[outline(mask)] = color
    return drawn


def overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    low: float,
    high: float,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
    outline_color: tuple[int, int, int] = (0, 255, 0),
) -> np.ndarray:
    """The image with its heatmap (colour scale as `colorize`) blended over it, and the mask outlined.

    `low` and `high` are fixed by the caller over a whole run, so that a calm part looks the same in
    every image and a defect stands out; `alpha` is the heatmap's weight. `mask` (bool, (H, W)), when
    given, is typically the predicted defect mask; its outline is drawn opaque in `outline_color`.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise GaussADError(f"overlay needs an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if anomaly_map.shape != image.shape[:2]:
        raise GaussADError(f"anomaly map of shape {anomaly_map.shape} for an image of shape {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise GaussADError(f"alpha must be in [0, 1], got {alpha}")
    heat = colorize(anomaly_map, low, high).astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
    result = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return result if mask is None else draw_outline(result, np.asarray(mask, dtype=bool), outline_color)


def write_pictures(
    folder: Path,
    name: Path,
    anomaly_map: np.ndarray,
    scale: tuple[float, float],
    mask: np.ndarray | None,
    image: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> None:
    """One image's pictures under `folder`: maps/<name>.png (the heatmap on the run's colour `scale`),
    masks/<name>.png (the defect mask, when given) and overlays/<name>.png (when the image is given, read
    within `max_pixels`: the heatmap blended over it, the mask outlined). The map is at the image's size."""
    pictures = {"maps": colorize(anomaly_map, *scale)}
    if mask is not None:
        pictures["masks"] = mask.astype(np.uint8) * 255
    if image is not None:
        pictures["overlays"] = overlay(
            np.asarray(read_image(image, max_pixels)), anomaly_map, *scale, mask=mask
        )
    for kind, picture in pictures.items():
        target = output_path(folder, kind, name, ".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(target)
