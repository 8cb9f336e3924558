"""Decisions from scores and maps, stated once for the CLI, the report and services built on gaussad.

A score at or above the image threshold is anomalous; the normalized score puts the threshold's typical
normal value at 0 and the threshold at 0.5; the defect mask is where the map reaches the pixel threshold;
pictures of maps share one colour scale per run. Also the names predictions are written under and
thresholds set by hand. Importable without torch: numpy and Pillow only.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from gaussad.calibration import Threshold
from gaussad.errors import GaussADError
from gaussad.images import find_images

PREDICTIONS_FILE = "predictions.csv"
PREDICTIONS_HEADER = ("path", "score", "normalized_score", "is_anomalous")


# --- image decisions ---


def is_anomalous(scores: ArrayLike, threshold: float) -> np.ndarray:
    """The decision rule: a score at or above the threshold is anomalous (bool, the shape of `scores`)."""
    return np.asarray(scores, dtype=np.float64) >= threshold


@dataclass(frozen=True)
class Decision:
    """One image's verdict. Without an image threshold only the raw score is known."""

    score: float
    normalized_score: float | None  # in [0, 1]: typical normal value 0, threshold 0.5
    is_anomalous: bool | None

    def as_dict(self) -> dict:
        return asdict(self)


def decide(score: float, image_threshold: Threshold | None) -> Decision:
    """The verdict on one image score."""
    return decide_all([score], image_threshold)[0]


def decide_all(scores: ArrayLike, image_threshold: Threshold | None) -> list[Decision]:
    """The verdicts on many image scores, in order."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if image_threshold is None:
        return [Decision(float(score), None, None) for score in scores]
    normalized = image_threshold.normalize(scores)
    flagged = is_anomalous(scores, image_threshold.value)
    return [
        Decision(float(score), float(level), bool(flag))
        for score, level, flag in zip(scores, normalized, flagged, strict=True)
    ]


class ImageErrors(NamedTuple):
    """Decisions at an image threshold against the labels (1 = defective)."""

    false_alarms: int  # good images scored at or above the threshold
    n_good: int
    misses: int  # defective images scored below the threshold
    n_defective: int

    @property
    def false_alarm_rate(self) -> float:
        return self.false_alarms / self.n_good if self.n_good else float("nan")

    @property
    def miss_rate(self) -> float:
        return self.misses / self.n_defective if self.n_defective else float("nan")


def image_errors(labels: ArrayLike, scores: ArrayLike, threshold: float) -> ImageErrors:
    """False alarms and misses when images are called anomalous by `is_anomalous`."""
    labels, flagged = np.asarray(labels), is_anomalous(scores, threshold)
    good, defective = labels == 0, labels == 1
    return ImageErrors(
        int((good & flagged).sum()), int(good.sum()), int((defective & ~flagged).sum()), int(defective.sum())
    )


def manual_threshold(value: float, previous: Threshold | None, kind: str) -> Threshold:
    """A threshold set by hand, keeping the typical normal value of the one it replaces (0 without one)."""
    normal_level = previous.normal_level if previous else 0.0
    if not np.isfinite(value) or value <= normal_level:
        raise GaussADError(
            f"{kind} threshold {value}: must be above the typical normal value {normal_level:.4g}"
        )
    return Threshold(float(value), normal_level, "manual", f"{kind} threshold set by hand")


# --- maps ---


def defect_mask(anomaly_map: np.ndarray, pixel_threshold: Threshold | None) -> np.ndarray | None:
    """The predicted defect: where the map reaches the pixel threshold (None without a threshold)."""
    return None if pixel_threshold is None else is_anomalous(anomaly_map, pixel_threshold.value)


def map_scale(
    pixel_threshold: Threshold | None, value_range: tuple[float, float] | None = None
) -> tuple[float, float]:
    """The (low, high) colour scale of a run's map pictures, the same for every picture so they compare.

    Calibrated: the threshold's typical normal value is dark and the threshold mid-scale, so a good part
    looks calm and a defect stands out whatever else the run holds. Uncalibrated: `value_range`, the
    (smallest, largest) value of all the run's maps.
    """
    if pixel_threshold is not None:
        return pixel_threshold.normal_level, 2.0 * pixel_threshold.value - pixel_threshold.normal_level
    if value_range is None:
        raise GaussADError("the colour scale of an uncalibrated model needs the range of the run's maps")
    return float(value_range[0]), float(value_range[1])


# --- outputs of predict ---


def output_names(inputs: Sequence[str | os.PathLike]) -> list[tuple[Path, Path]]:
    """(image, output name) pairs for predict's outputs.

    A folder's images are named by their path relative to that folder, a file by its name, each without
    its suffix: every output adds its own (`output_path`). Two inputs that would write the same files
    (`a/x.png` and `a/x.jpg`, or the same file name from two folders) are an error, not an overwrite.
    """
    pairs: list[tuple[Path, Path]] = []
    for given in map(Path, inputs):
        base = given.parent if given.is_file() else given
        pairs += [(image, image.relative_to(base).with_suffix("")) for image in find_images(given)]
    seen: dict[Path, Path] = {}
    for image, name in pairs:
        if name in seen:
            raise GaussADError(
                f"{image} and {seen[name]} would both be written as {name} (maps/{name}.npy and .png)"
            )
        seen[name] = image
    return pairs


def output_path(folder: Path, kind: str, name: Path, suffix: str) -> Path:
    """Where an output goes, e.g. maps/a/x.npy for the name a/x (appended: a name may hold dots)."""
    return folder / kind / name.parent / (name.name + suffix)


def predictions_csv(paths: Sequence[str | os.PathLike], decisions: Sequence[Decision]) -> str:
    """predictions.csv: path, raw score, and without an image threshold empty decision columns."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(PREDICTIONS_HEADER)
    for path, decision in zip(paths, decisions, strict=True):
        normalized = "" if decision.normalized_score is None else f"{decision.normalized_score:.4f}"
        flagged = "" if decision.is_anomalous is None else str(int(decision.is_anomalous))
        writer.writerow([str(path), f"{decision.score:.6f}", normalized, flagged])
    return buffer.getvalue()
