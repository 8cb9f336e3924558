"""Thresholds a production line can act on, and scores normalized around them.

Label-free (default): the good training images are split into folds; each fold is scored by Gaussians
fitted without it, which gives honest "normal" scores and maps. The image threshold is the (1 - rate)
quantile of the held-out scores for a target false-alarm rate; the pixel threshold is the same quantile of
each held-out image's maximum map value, so that a good part's defect mask is empty at that rate too.
Training images whose held-out score lies far above the others' (`far_out`) are left out of both: most
likely defective parts that slipped into the good images, whose scores would set the threshold among
the defects. The quantile keeps its promise for images like the training images: `score_shift` tells from
good images' scores whether they are (evaluations report it).
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
# Good images whose scores lie above the held-out scores with a one-sided p-value under this are not like
# the training images (`score_shift`).
SHIFT_SIGNIFICANCE = 0.01


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


@dataclass
class ScoreShift:
    """How good images' scores stand against the held-out scores a label-free threshold came from:
    `auroc`, the probability that a good image outscores a held-out training image (ties half; 0.5 where
    they are alike), and `p_value`, the one-sided Mann-Whitney U test's of no shift upwards."""

    auroc: float
    p_value: float

    @property
    def significant(self) -> bool:
        """Whether the good images score above the training images beyond chance (`SHIFT_SIGNIFICANCE`):
        the threshold then flags more of them than its target."""
        return self.p_value < SHIFT_SIGNIFICANCE


def score_shift(held_out: np.ndarray, good: np.ndarray) -> ScoreShift | None:
    """Whether images known to be good score above the held-out scores of the training images that set the
    label-free threshold (those not far out): a quantile of held-out scores flags its target share of
    images like the training images, and more of images that score higher (another batch of parts, other
    light, a camera moved). None with fewer than two of either."""
    held_out, good = np.asarray(held_out, dtype=np.float64), np.asarray(good, dtype=np.float64)
    if held_out.size < 2 or good.size < 2:
        return None
    # Imported here, as scikit-learn below: scipy.stats takes a while to import and only this needs it.
    from scipy.stats import mannwhitneyu

    test = mannwhitneyu(good, held_out, alternative="greater")
    return ScoreShift(float(test.statistic) / (good.size * held_out.size), float(test.pvalue))


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
