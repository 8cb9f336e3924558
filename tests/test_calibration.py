"""Thresholds: quantiles for a false-alarm rate, F1-optimal points, normalization; counts: test_decisions."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from gaussad.calibration import (
    FAR_OUT_FENCE,
    SHIFT_SIGNIFICANCE,
    Threshold,
    f1_threshold,
    far_out,
    quantile_threshold,
    score_shift,
)
from gaussad.errors import GaussADError


def test_quantile_threshold_flags_about_the_target_rate() -> None:
    normal = np.random.default_rng(0).normal(10, 2, size=10_000)
    threshold = quantile_threshold(normal, 0.01, "label-free", "test")
    assert np.mean(normal >= threshold.value) == pytest.approx(0.01, abs=0.001)
    assert threshold.normal_level == pytest.approx(np.median(normal))
    with pytest.raises(GaussADError, match="false-alarm rate"):
        quantile_threshold(normal, 1.5, "label-free", "test")


def test_a_quantile_from_too_few_values_for_the_rate_says_so() -> None:
    # From n values the (1 - rate) quantile lies between the highest two where (n - 1) * rate < 1.
    for n, rate, too_few in ((100, 0.01, True), (101, 0.01, False), (30, 0.05, False), (20, 0.05, True)):
        normal = np.random.default_rng(n).normal(10, 2, size=n)
        threshold = quantile_threshold(normal, rate, "label-free", "test")
        assert ("too few for that rate" in threshold.source) is too_few, (n, rate)
        assert threshold.source.startswith("test")
        if too_few:
            second, highest = np.sort(normal)[-2:]
            assert second <= threshold.value <= highest


def test_far_out_flags_values_beyond_the_fence_above_the_upper_quartile() -> None:
    # With one value far below and one high: quartiles 25.25 and 75.75 whatever the high value is.
    fence = 75.75 + FAR_OUT_FENCE * 50.5
    for high, flagged in ((fence, False), (np.nextafter(fence, np.inf), True), (1e9, True)):
        values = np.concatenate([[-1e6], np.arange(1.0, 101.0), [high]])
        assert far_out(values).tolist() == [False] * 101 + [flagged]  # the lower tail is no defect
    assert not far_out(np.random.default_rng(0).normal(size=2000)).any()  # 4.7 sigma: good data seldom
    assert not far_out(np.array([1.0, 2.0, 1e9])).any()  # three values have no quartiles to speak of
    assert not far_out(np.array([5.0] * 8 + [5.1, 9.0])).any()  # nor has a run of equal values a spread


def test_score_shift_tells_good_images_that_score_above_the_held_out_ones() -> None:
    rng = np.random.default_rng(0)
    held_out = rng.normal(20.0, 2.0, size=200)
    alike = score_shift(held_out, rng.normal(20.0, 2.0, size=40))
    assert 0.35 < alike.auroc < 0.65 and not alike.significant
    above = score_shift(held_out, rng.normal(23.0, 2.0, size=40))  # another batch, other light
    assert above.auroc > 0.8 and above.p_value < 1e-6 and above.significant
    assert not score_shift(held_out, rng.normal(17.0, 2.0, size=40)).significant  # lower flags fewer
    # The probability that a good image outscores a held-out one, ties half; the test's one-sided p-value.
    exact = score_shift(np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 5.0]))
    assert exact.auroc == pytest.approx((1.5 + 4) / 8)
    assert score_shift(np.arange(100.0), np.arange(100.0, 110.0)).p_value < SHIFT_SIGNIFICANCE
    assert score_shift(held_out, np.array([30.0])) is None and score_shift(held_out[:1], held_out) is None


def test_f1_threshold_is_the_best_threshold() -> None:
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(200), np.ones(50)]
    scores = np.r_[rng.normal(0, 1, 200), rng.normal(2, 1, 50)]
    threshold = f1_threshold(labels, scores, "test")
    best = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    assert f1_score(labels, scores >= threshold.value) == pytest.approx(best)
    with pytest.raises(GaussADError, match="both normal and anomalous"):
        f1_threshold(np.zeros(5), np.arange(5.0), "test")


def test_normalize_puts_normal_at_zero_and_threshold_at_half() -> None:
    threshold = Threshold(value=30.0, normal_level=10.0, method="manual", source="test")
    np.testing.assert_allclose(
        threshold.normalize([0.0, 10.0, 20.0, 30.0, 40.0, 60.0]), [0, 0, 0.25, 0.5, 0.75, 1]
    )
