"""Decisions from scores and maps, stated once for the CLI, the report and services built on gaussad.

A score at or above the image threshold is anomalous; the normalized score puts the threshold's typical
normal value at 0 and the threshold at 0.5; the defect mask is where the map reaches the pixel threshold,
and is never empty for an image called anomalous; pictures of maps share one colour scale per run. Also
where a defect lies (area, regions, box), the names predictions are written under, predictions.csv and
thresholds set by hand. Importable without torch: numpy, scipy and Pillow only.
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
from scipy import ndimage

from gaussad.calibration import Threshold
from gaussad.errors import GaussADError
from gaussad.images import PREDICTIONS_FILE as PREDICTIONS_FILE  # also the marker of predict's output
from gaussad.images import find_images

PREDICTIONS_HEADER = (
    "path",
    "score",
    "normalized_score",
    "is_anomalous",
    "defect_area",
    "defect_regions",
    "defect_box",
    "error",
)
# An anomalous image whose map stays below the pixel threshold shows the region where its map is within
# this share of the peak's height above the typical normal value: half height, the peak's own extent.
HOT_REGION_SHARE = 0.5


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


def defect_mask(
    anomaly_map: np.ndarray, pixel_threshold: Threshold | None, anomalous: bool | None = None
) -> np.ndarray | None:
    """The predicted defect (bool, the map's shape; None without a pixel threshold): where the map reaches
    the pixel threshold.

    For an image decided anomalous (`anomalous`) whose map stays below the pixel threshold everywhere, its
    hottest region instead: where the map reaches half the peak's height above the threshold's typical
    normal value. The two thresholds are each set for the same false-alarm rate on different quantities
    (an image's pooled features, a map's maximum), so such images occur; their mask is never empty.
    """
    if pixel_threshold is None:
        return None
    mask = is_anomalous(anomaly_map, pixel_threshold.value)
    if anomalous and not mask.any():
        peak = float(np.max(anomaly_map))
        level = peak - HOT_REGION_SHARE * (peak - pixel_threshold.normal_level)
        mask = anomaly_map >= min(level, peak)
    return mask


@dataclass(frozen=True)
class Defect:
    """Where a defect mask lies, for a line to act on: its size, its pieces and the largest one's box."""

    area: int  # pixels in the mask
    regions: int  # 8-connected regions (as AUPRO counts ground-truth regions)
    box: tuple[int, int, int, int] | None  # the largest region's (x0, y0, x1, y1), x1 and y1 exclusive

    def box_text(self) -> str:
        """The box as predictions.csv writes it, "x0 y0 x1 y1" (PIL's crop box); empty without one."""
        return "" if self.box is None else " ".join(map(str, self.box))


def describe_defect(mask: np.ndarray) -> Defect:
    """The area, number of 8-connected regions and largest region's bounding box of a bool mask."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return Defect(0, 0, None)
    largest = int(np.argmax(np.bincount(labels.ravel())[1:]))
    rows, columns = ndimage.find_objects(labels)[largest]
    return Defect(
        int(np.count_nonzero(mask)), int(count), (columns.start, rows.start, columns.stop, rows.stop)
    )


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


def output_names(
    inputs: Sequence[str | os.PathLike], exclude: Sequence[str | os.PathLike] = ()
) -> list[tuple[Path, Path]]:
    """(image, output name) pairs for predict's outputs.

    A folder's images are named by their path relative to that folder, a file by its name, each without
    its suffix: every output adds its own (`output_path`). Two inputs that would write the same files
    (`a/x.png` and `a/x.jpg`, or the same file name from two folders) are an error, not an overwrite.
    Folders in `exclude` (the run's own output) and earlier outputs of predict are not searched.
    """
    pairs: list[tuple[Path, Path]] = []
    for given in map(Path, inputs):
        base = given.parent if given.is_file() else given
        pairs += [(image, image.relative_to(base).with_suffix("")) for image in find_images(given, exclude)]
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


@dataclass(frozen=True)
class PredictionRow:
    """One line of predictions.csv: an image's decision and defect, or the error that skipped it."""

    path: str
    decision: Decision | None = None  # None for an image skipped
    defect: Defect | None = None  # None without a pixel threshold, or skipped
    error: str = ""  # why the image was skipped


def predictions_csv(rows: Sequence[PredictionRow]) -> str:
    """predictions.csv (PREDICTIONS_HEADER): per image its raw score, the decision at the image threshold,
    where the defect mask lies, or the error that skipped it. Columns a model or an image cannot fill are
    empty (no image threshold: no decision; no pixel threshold: no defect; skipped: only the error)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(PREDICTIONS_HEADER)
    for row in rows:
        decision, defect = row.decision, row.defect
        columns = [""] * 6
        if decision is not None:
            columns[0] = f"{decision.score:.6f}"
            if decision.normalized_score is not None:
                columns[1] = f"{decision.normalized_score:.4f}"
            if decision.is_anomalous is not None:
                columns[2] = str(int(decision.is_anomalous))
        if defect is not None:
            columns[3:] = [str(defect.area), str(defect.regions), defect.box_text()]
        writer.writerow([row.path, *columns, row.error])
    return buffer.getvalue()
