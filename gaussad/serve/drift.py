"""Drift: whether the images a model sees still look like the normal images it was calibrated on.

Over a rolling window of a model's recent scores, two signals, each with the level at which the line
should look (`DriftReport.look`):

- the share flagged against the expected false-alarm rate, which is the share of the held-out normal
  scores kept at fit time (`GaussAD.threshold_scores_`: the training images' held-out scores but the far-out
  ones, likely defective) at or above the current image threshold. Look
  when the share exceeds it by more than 3 standard errors of a binomial share over the window (the rate
  taken as at least 1/m for m held-out scores): more parts are flagged than false alarms explain (a run of
  defects, or normal parts that changed).
- the two-sample Kolmogorov-Smirnov statistic between the window's scores and the held-out normal scores.
  Look when it exceeds the test's critical value at the 0.1% level for the two sample sizes,
  1.95 * sqrt((n + m) / (n * m)): the scores as a whole no longer look drawn from the normal ones (lighting,
  camera, material or fixture changed), even where few parts cross the threshold.

Both need `MIN_IMAGES` in the window before they can call for a look.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import ks_2samp

KS_ALPHA = 0.001
KS_COEFFICIENT = math.sqrt(-math.log(KS_ALPHA / 2) / 2)  # c(alpha) of the asymptotic two-sample test
FLAGGED_SIGMAS = 3.0
MIN_IMAGES = 50


@dataclass(frozen=True)
class DriftReport:
    """A model's drift over its window. Rates and statistics are None where they cannot be computed."""

    images: int  # in the window
    flagged_share: float | None
    expected_flagged_share: float | None  # held-out normal scores at or above the threshold
    flagged_alert_level: float | None
    ks_statistic: float | None
    ks_alert_level: float | None
    look: bool  # a signal is over its level, with MIN_IMAGES or more in the window

    def as_dict(self) -> dict:
        return asdict(self)


class DriftMonitor:
    """The rolling window of one served model's scores (thread-safe: scrapes read while requests add)."""

    def __init__(self, held_out_scores: np.ndarray, threshold: float, window: int) -> None:
        self._normal = np.sort(np.asarray(held_out_scores, dtype=np.float64))
        self._threshold = threshold
        self._scores: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    def add(self, score: float) -> None:
        with self._lock:
            self._scores.append(score)

    def report(self) -> DriftReport:
        with self._lock:
            scores = np.fromiter(self._scores, dtype=np.float64)
        n, m = len(scores), len(self._normal)
        flagged = float(np.mean(scores >= self._threshold)) if n else None
        expected = float(np.mean(self._normal >= self._threshold)) if m else None
        flagged_level = ks = ks_level = None
        if n and expected is not None:
            rate = max(expected, 1 / m)  # m held-out scores cannot tell a rate below 1 / m
            flagged_level = expected + FLAGGED_SIGMAS * math.sqrt(rate * (1 - rate) / n)
        if n and m:
            ks = float(ks_2samp(scores, self._normal).statistic)
            ks_level = KS_COEFFICIENT * math.sqrt((n + m) / (n * m))
        look = n >= MIN_IMAGES and (
            (flagged_level is not None and flagged > flagged_level) or (ks is not None and ks > ks_level)
        )
        return DriftReport(n, flagged, expected, flagged_level, ks, ks_level, bool(look))
