"""Anomaly maps as pictures: a colour scale fixed over a whole run, so maps are comparable."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps

_LUT = (colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def colorize(anomaly_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """An (H, W) map as an (H, W, 3) uint8 image: `low` and below dark, `high` and above bright."""
    span = max(high - low, np.finfo(np.float32).eps)
    index = np.clip((anomaly_map - low) / span * 255.0, 0, 255).astype(np.uint8)
    return _LUT[index]
