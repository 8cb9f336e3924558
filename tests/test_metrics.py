"""Tests of the evaluation metrics against a brute-force reference, hand-worked cases and sklearn."""

from bisect import bisect

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from gaussad.errors import GaussADError
from gaussad.metrics import aupro, image_auroc, pixel_auroc, pixel_metrics, pro_curve

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)
FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def brute_force_curve(masks, maps, structure=EIGHT_CONNECTED):
    """The PRO curve by thresholding at every distinct score, from the highest down."""
    scores = np.concatenate([np.ravel(m) for m in maps]).astype(np.float64)
    normal = np.concatenate([np.ravel(m) == 0 for m in masks])
    regions, start = [], 0
    for mask in masks:
        labeled, count = ndimage.label(mask, structure=structure)
        for k in range(1, count + 1):
            region = np.zeros(len(scores), dtype=bool)
            region[start : start + labeled.size] = labeled.ravel() == k
            regions.append(region)
        start += labeled.size
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(scores)[::-1]:
        above = scores >= threshold
        fprs.append((above & normal).sum() / normal.sum())
        pros.append(np.mean([above[region].mean() for region in regions]))
    return np.array([*fprs, 1.0]), np.array([*pros, 1.0])


def brute_force_aupro(masks, maps, fpr_limit=0.3, structure=EIGHT_CONNECTED):
    """Integrate like the MVTec AD script: trapezoids up to the limit, PRO interpolated at the limit."""
    fprs, pros = brute_force_curve(masks, maps, structure)
    correction = 0.0
    if fpr_limit not in fprs:
        ins = bisect(fprs, fpr_limit)
        y_interp = pros[ins - 1] + (pros[ins] - pros[ins - 1]) * (fpr_limit - fprs[ins - 1]) / (
            fprs[ins] - fprs[ins - 1]
        )
        correction = 0.5 * (y_interp + pros[ins - 1]) * (fpr_limit - fprs[ins - 1])
    keep = fprs <= fpr_limit
    x, y = fprs[keep], pros[keep]
    return (np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction) / fpr_limit


def random_masks(rng, n_images, height, width, defect_free=1):
    """Random rectangular blobs (some touching or overlapping); the first `defect_free` images are clean."""
    masks = np.zeros((n_images, height, width), dtype=bool)
    for image in range(defect_free, n_images):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, height), rng.integers(0, width)
            masks[image, y : y + rng.integers(1, 4), x : x + rng.integers(1, 5)] = True
    return masks


def random_case(seed, kind):
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, n_images=4, height=9, width=11)
    maps = rng.random(masks.shape) + 0.4 * masks
    if kind == "float32":
        maps = maps.astype(np.float32)
    elif kind == "ties":
        maps = np.round(maps, 1).astype(np.float32)
    elif kind == "float64 ties":
        maps = np.round(maps, 1)
    elif kind == "uint8":
        maps = (maps * 4).astype(np.uint8)
    elif kind == "int64":
        maps = (maps * 4).astype(np.int64) - 2
    elif kind == "signed zeros":
        maps = ((np.round(maps * 4) - 2) * rng.choice([-1, 1], size=maps.shape)).astype(np.float32)
        assert np.signbit(maps[maps == 0]).any() and not np.signbit(maps[maps == 0]).all()
    elif kind == "constant":
        maps = np.full(masks.shape, 0.5, dtype=np.float32)
    return masks, maps


KINDS = ["float64", "float32", "ties", "float64 ties", "uint8", "int64", "signed zeros", "constant"]
CASES = [(seed, kind) for kind in KINDS for seed in range(3)]


@pytest.mark.parametrize(("seed", "kind"), CASES)
def test_aupro_matches_brute_force(seed, kind):
    masks, maps = random_case(seed, kind)
    for fpr_limit in (0.05, 0.3, 1.0):
        assert aupro(masks, maps, fpr_limit) == pytest.approx(
            brute_force_aupro(masks, maps, fpr_limit), abs=1e-9
        )


@pytest.mark.parametrize(("seed", "kind"), CASES)
def test_pro_curve_matches_brute_force(seed, kind):
    masks, maps = random_case(seed, kind)
    fpr, pro = pro_curve(masks, maps)
    expected_fpr, expected_pro = brute_force_curve(masks, maps)
    np.testing.assert_allclose(fpr, expected_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(pro, expected_pro, rtol=0, atol=1e-12)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)


@pytest.mark.parametrize(("seed", "kind"), CASES)
def test_pixel_auroc_matches_sklearn_and_pixel_metrics_matches_separate(seed, kind):
    masks, maps = random_case(seed, kind)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-9)
    assert pixel_metrics(masks, maps) == (pixel_auroc(masks, maps), aupro(masks, maps))


@pytest.mark.parametrize(("seed", "kind"), CASES)
def test_results_stay_in_unit_interval(seed, kind):
    masks, maps = random_case(seed, kind)
    fpr, pro = pro_curve(masks, maps)
    assert fpr.min() >= 0 and pro.min() >= 0 and fpr.max() <= 1 and pro.max() <= 1
    assert 0 <= aupro(masks, maps) <= 1
    assert 0 <= pixel_auroc(masks, maps) <= 1


def test_images_of_different_sizes_as_lists():
    rng = np.random.default_rng(7)
    masks = [random_masks(rng, 1, h, w, defect_free=0)[0] for h, w in [(6, 8), (9, 5), (4, 4)]]
    maps = [np.round(rng.random(m.shape) + 0.3 * m, 1).astype(np.float32) for m in masks]
    assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps), abs=1e-9)
    flat_masks = np.concatenate([m.ravel() for m in masks])
    flat_maps = np.concatenate([m.ravel() for m in maps])
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-9)


def test_perfect_separation_gives_one():
    masks = random_masks(np.random.default_rng(1), n_images=3, height=8, width=8)
    maps = np.where(masks, 2.0, 1.0) + 0.1 * np.random.default_rng(2).random(masks.shape)
    assert pixel_metrics(masks, maps) == (pytest.approx(1.0, abs=1e-12), pytest.approx(1.0, abs=1e-12))


def test_inverted_scores_give_zero():
    masks = random_masks(np.random.default_rng(1), n_images=3, height=8, width=8)
    maps = np.where(masks, 1.0, 2.0) + 0.1 * np.random.default_rng(2).random(masks.shape)
    assert pixel_metrics(masks, maps) == (0.0, 0.0)


def test_hand_worked_case_without_interpolation():
    # One row: A (1 pixel, 0.9) | normal 0.85 | B (2 pixels, 0.8 and 0.1) | 9 normals from 0.7 to 0.2.
    # 10 normal pixels, 2 regions: an A pixel adds 1/2 to PRO, a B pixel 1/4.
    # Curve: (0,0) (0,.5) (.1,.5) (.1,.75) (.2,.75) (.3,.75) ... (1,.75) (1,1) (1,1).
    # Area up to .3: .1 * .5 + .2 * .75 = .2, so AUPRO = .2 / .3 = 2/3.
    # AUROC: A beats 10 normals, B's 0.8 beats 9, B's 0.1 beats none: 19 of 30 pairs.
    mask = np.array([[1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    score = np.array([[0.9, 0.85, 0.8, 0.1, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2]])
    assert aupro([mask], [score]) == pytest.approx(2 / 3, abs=1e-12)
    assert pixel_auroc([mask], [score]) == pytest.approx(19 / 30, abs=1e-12)


def test_hand_worked_case_with_tie_and_interpolation():
    # One row: A (0.9) | normal 0.8 | normal 0.7 | B (0.7, tied with a normal) | normals 0.2, 0.1.
    # 4 normal pixels, 2 one-pixel regions (1/2 of PRO each). The tie at 0.7 is one point:
    # (0,0) (0,.5) (.25,.5) (.5,1) (.75,1) (1,1) (1,1). At FPR .3 PRO is interpolated to .6:
    # area = .25 * .5 + (.5 + .6) / 2 * .05 = .1525, so AUPRO = .1525 / .3 = 61/120.
    # AUROC: A beats 4 normals, B beats 2 and ties 1: 6.5 of 8 pairs.
    mask = np.array([[1, 0, 0, 1, 0, 0]])
    score = np.array([[0.9, 0.8, 0.7, 0.7, 0.2, 0.1]], dtype=np.float32)
    assert aupro([mask], [score]) == pytest.approx(61 / 120, abs=1e-12)
    assert pixel_auroc([mask], [score]) == pytest.approx(6.5 / 8, abs=1e-12)


def test_diagonal_pixels_form_one_region():
    # The two diagonal pixels are one region of size 2 (each pixel 1/4 of PRO), C at the corner another
    # (1/2). Diagonal pixels score highest, C lowest, so PRO stays at 1/2 over the whole FPR range.
    # With 4-connectivity there would be three regions of 1/3 each, and PRO 2/3 instead.
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[3, 3] = True
    score = np.zeros((4, 4))
    score[~mask] = np.linspace(0.1, 0.7, 13)
    score[0, 0], score[1, 1], score[3, 3] = 0.9, 0.8, 0.0
    assert aupro([mask], [score]) == pytest.approx(0.5, abs=1e-12)
    assert brute_force_aupro([mask], [score]) == pytest.approx(0.5, abs=1e-12)
    assert brute_force_aupro([mask], [score], structure=FOUR_CONNECTED) == pytest.approx(2 / 3, abs=1e-12)


def test_constant_map_gives_the_diagonal():
    # All scores tie: the curve is (0,0) (1,1) (1,1), PRO = FPR, so AUPRO = (.3 * .3 / 2) / .3 = 0.15.
    masks, maps = random_case(0, "constant")
    assert aupro(masks, maps) == pytest.approx(0.15, abs=1e-12)
    assert brute_force_aupro(masks, maps) == pytest.approx(0.15, abs=1e-12)
    assert pixel_auroc(masks, maps) == 0.5


def test_rounding_never_lifts_pro_above_one():
    # Many regions of odd sizes: their weights 1 / (size * n_regions) do not sum to exactly 1 in floats.
    masks = np.zeros((2, 40, 40), dtype=bool)
    for index, size in enumerate([1, 3, 7, 11, 13, 17, 19, 23, 29, 31, 37, 3, 7, 9]):
        masks[index % 2, 3 * (index // 2), :size] = True
    maps = masks + np.random.default_rng(3).random(masks.shape)
    _, pro = pro_curve(masks, maps)
    assert pro.max() <= 1.0
    assert aupro(masks, maps) <= 1.0
    assert aupro(masks, maps, fpr_limit=1.0) <= 1.0


def test_image_auroc_matches_sklearn():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4])
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 1, 1], [0.1, 0.2], "same length"),
        ([], [], "at least one image"),
        ([0, 2], [0.1, 0.2], "0 \\(normal\\) or 1"),
        ([1, 1], [0.1, 0.2], "both normal and anomalous"),
        ([0, 1], [0.1, np.nan], "NaN"),
    ],
)
def test_image_auroc_errors(labels, scores, message):
    with pytest.raises(GaussADError, match=message):
        image_auroc(labels, scores)


GOOD_MASKS = np.array([[[0, 1], [0, 0]]])
GOOD_MAPS = np.array([[[0.1, 0.9], [0.2, 0.3]]])


@pytest.mark.parametrize(
    ("masks", "maps", "message"),
    [
        (GOOD_MASKS, np.zeros((1, 2, 3)), "same size"),
        (GOOD_MASKS[0], GOOD_MAPS[0], "2-D"),
        ([GOOD_MASKS[0]], [GOOD_MAPS[0], GOOD_MAPS[0]], "1 masks for 2 anomaly maps"),
        (np.zeros((0, 2, 2)), np.zeros((0, 2, 2)), "at least one image"),
        (np.zeros((2, 0, 2)), np.zeros((2, 0, 2)), "at least one pixel"),
        (np.zeros((1, 2, 2)), GOOD_MAPS, "no anomalous pixel"),
        (np.ones((1, 2, 2)), GOOD_MAPS, "no normal pixel"),
        (GOOD_MASKS * 255, GOOD_MAPS, "bool or 0/1"),
        (GOOD_MASKS, np.where(GOOD_MASKS, np.nan, GOOD_MAPS), "NaN"),
        (GOOD_MASKS, GOOD_MAPS.astype(complex), "real numbers"),
    ],
)
def test_pixel_metric_errors(masks, maps, message):
    for metric in (pixel_auroc, aupro, pixel_metrics, pro_curve):
        with pytest.raises(GaussADError, match=message):
            metric(masks, maps)


@pytest.mark.parametrize("fpr_limit", [0.0, -0.1, 1.5])
def test_fpr_limit_out_of_range(fpr_limit):
    with pytest.raises(GaussADError, match="FPR limit"):
        aupro(GOOD_MASKS, GOOD_MAPS, fpr_limit)
    with pytest.raises(GaussADError, match="FPR limit"):
        pixel_metrics(GOOD_MASKS, GOOD_MAPS, fpr_limit)
