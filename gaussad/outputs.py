"""What `predict` writes per image: its raw map, its pictures and its row of predictions.csv.

One writer for both engines, so that they write the same files: the local engine scores all images in one
call, into the folder it stages; the Ray engine scores one shard of them per call, on a worker, into the
shared folder of the run. A model with a pixel threshold draws each picture as its map is made; one
without draws them afterwards (`draw_saved`), on the colour scale of the range of all the run's maps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gaussad import heatmaps
from gaussad.decisions import (
    Decision,
    Defect,
    PredictionRow,
    decide_all,
    defect_mask,
    describe_defect,
    map_scale,
    output_path,
)
from gaussad.images import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from gaussad.features import ImageError
    from gaussad.model import GaussAD
    from gaussad.runtime import OnnxModel


@dataclass
class ScoredImages:
    """What one call of `PredictionWriter.score` wrote: rows and errors by position among the run's
    inputs, and the range of the maps (each row's own, for a run that draws its pictures at the end)."""

    rows: dict[int, PredictionRow] = field(default_factory=dict)  # errors included, as error rows
    errors: list[ImageError] = field(default_factory=list)
    map_ranges: dict[int, tuple[float, float]] = field(default_factory=dict)  # (min, max) per map

    def in_order(self) -> list[PredictionRow]:
        """The rows in the order of the inputs, as predictions.csv lists them."""
        return [self.rows[index] for index in sorted(self.rows)]


class PredictionWriter:
    """Writes predict's outputs for a run's (image, output name) `pairs` under `folder`: all of them, or
    those of one shard by their positions among the run's inputs."""

    def __init__(
        self,
        folder: Path,
        pairs: Sequence[tuple[Path, Path]] | Mapping[int, tuple[Path, Path]],
        model: GaussAD | OnnxModel,
        overlays: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.folder = folder
        self.pairs = pairs
        self.model = model
        self.overlays = overlays
        self.max_pixels = max_pixels
        pixel_threshold = model.pixel_threshold_
        # A calibrated model's colour scale is known now; an uncalibrated one's is the range of all maps.
        self.scale = map_scale(pixel_threshold) if pixel_threshold else None

    def score(self, indices: Sequence[int]) -> ScoredImages:
        """Score the run's images at `indices` (`iter_predict`), writing each raw map and, with a pixel
        threshold, its pictures; an unreadable image (on_error="skip") becomes an error row."""
        scored = ScoredImages()
        images = [self.pairs[index][0] for index in indices]
        # Closed on any error: the generator's progress bar ends its line before the error is printed.
        with closing(self.model.iter_predict(images)) as batches:
            for batch in batches:
                decisions = decide_all(batch.scores, self.model.image_threshold_)
                for position, anomaly_map, decision in zip(batch.indices, batch.maps, decisions, strict=True):
                    index = indices[position]
                    target = output_path(self.folder, "maps", self.pairs[index][1], ".npy")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    np.save(target, anomaly_map)
                    scored.map_ranges[index] = float(anomaly_map.min()), float(anomaly_map.max())
                    defect = self._pictures(index, anomaly_map, self.scale, decision) if self.scale else None
                    scored.rows[index] = PredictionRow(str(self.pairs[index][0]), decision, defect)
                for error in batch.errors:
                    index = indices[error.index]
                    scored.errors.append(replace(error, index=index))
                    scored.rows[index] = PredictionRow(str(self.pairs[index][0]), error=error.message)
        return scored

    def draw_saved(self, indices: Iterable[int], value_range: tuple[float, float]) -> None:
        """The pictures of an uncalibrated model, from the maps saved under `folder`: heatmaps (and
        overlays) on the scale of `value_range`, the run's (smallest, largest) map value; no masks."""
        scale = map_scale(None, value_range)
        for index in indices:
            anomaly_map = np.load(output_path(self.folder, "maps", self.pairs[index][1], ".npy"))
            self._pictures(index, anomaly_map, scale, None)

    def _pictures(
        self, index: int, anomaly_map: np.ndarray, scale: tuple[float, float], decision: Decision | None
    ) -> Defect | None:
        """Draw one image's pictures; where its defect mask lies (None without a pixel threshold)."""
        image, name = self.pairs[index]
        anomalous = decision.is_anomalous if decision else None
        mask = defect_mask(anomaly_map, self.model.pixel_threshold_, anomalous)
        overlay_image = image if self.overlays else None
        heatmaps.write_pictures(self.folder, name, anomaly_map, scale, mask, overlay_image, self.max_pixels)
        return None if mask is None else describe_defect(mask)


def overall_range(ranges: Iterable[tuple[float, float]]) -> tuple[float, float] | None:
    """The (smallest, largest) value over maps' (min, max) pairs; None for no maps."""
    low, high = math.inf, -math.inf
    for each_low, each_high in ranges:
        low, high = min(low, each_low), max(high, each_high)
    return None if low > high else (low, high)
