"""Thresholds a production line can act on, and scores normalized around them.

Label-free (default): the good training images are split into folds; each fold is scored by Gaussians
fitted without it, which gives honest "normal" scores and maps. The image threshold is the (1 - rate)
quantile of the held-out scores for a target false-alarm rate; the pixel threshold is the same quantile of
each held-out image's maximum map value, so that a good part's defect mask is empty at that rate too.
Training images whose held-out score lies far above the others' (`far_out`) are left out of both: most
likely defective parts that slipped into the good images, whose scores would set the threshold among
the defects.
With labels (`evaluation.calibrate_on_labeled`): the F1-optimal point, or the rate measured on labelled
good images. A manual value (`decisions.manual_threshold`) overrides either. Every threshold records how,
and on what, it was chosen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from gaussad.errors import GaussADError

# Tukey's fence for "far out" values: beyond the upper quartile by this many interquartile ranges.
FAR_OUT_FENCE = 3.0


@dataclass
class Threshold:
    """A decision threshold on raw scores (image) or raw map values (pixel), with its provenance.

    `normal_level` is a typical normal value (the median of the normal data it was chosen on): normalized
    scores map it to 0 and the threshold to 0.5.
    """

    value: float
    normal_level: float
    method: str  # "label-free", "f1", "false-alarm-rate" or "manual"
    source: str  # one line: how and on what data

    def normalize(self, values: np.ndarray) -> np.ndarray:
        """Scores in [0, 1]: the typical normal value at 0, the threshold at 0.5, linear in between."""
        span = max(self.value - self.normal_level, np.finfo(np.float64).eps * max(abs(self.value), 1.0))
        return np.clip(0.5 + 0.5 * (np.asarray(values, dtype=np.float64) - self.value) / span, 0.0, 1.0)

    def as_dict(self) -> dict:
        return asdict(self)


def check_rate(rate: float) -> None:
    if not 0.0 < rate < 1.0:
        raise GaussADError(f"false-alarm rate {rate}: expected a fraction in (0, 1), e.g. 0.01")


def far_out(values: np.ndarray, fence: float = FAR_OUT_FENCE) -> np.ndarray:
    """Which values lie more than `fence` interquartile ranges above the upper quartile (bool per value):
    held-out scores that good images seldom reach and defective ones do. None of fewer than four values, nor
    where half of them are equal (no spread to measure a distance by)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 4:
        return np.zeros(values.shape, dtype=bool)
    lower, upper = np.quantile(values, [0.25, 0.75])
    if not upper > lower:
        return np.zeros(values.shape, dtype=bool)
    return values > upper + fence * (upper - lower)


def quantile_threshold(normal: np.ndarray, rate: float, method: str, source: str) -> Threshold:
    """The (1 - rate) quantile of normal values: about `rate` of normal data lies above it. From fewer than
    1 / rate + 1 values it lies between the highest two whatever the rate, so they cannot tell how much
    normal data it flags; the source then says so."""
    check_rate(rate)
    normal = np.asarray(normal, dtype=np.float64)
    if normal.size >= 2 and (normal.size - 1) * rate < 1:
        source += f"; {normal.size} values are too few for that rate: it lies between the highest two"
    return Threshold(float(np.quantile(normal, 1.0 - rate)), float(np.median(normal)), method, source)


def f1_threshold(labels: np.ndarray, values: np.ndarray, source: str) -> Threshold:
    """The threshold with the best F1 score for 'anomalous' on labelled data."""
    # Imported here: Threshold is used where scikit-learn is not needed (decisions, the CLI's parsing).
    from sklearn.metrics import precision_recall_curve

    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        raise GaussADError("F1 calibration needs both normal and anomalous examples")
    precision, recall, thresholds = precision_recall_curve(labels, values)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    best = int(np.argmax(f1))
    normal_level = float(np.median(np.asarray(values)[~labels]))
    return Threshold(float(thresholds[best]), normal_level, "f1", f"{source}; F1 {f1[best]:.3f}")
