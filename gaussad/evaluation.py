"""Evaluation on data in MVTec AD layout (`gaussad.layout`): fit on train/good, score test/, compare with
ground truth.

A category without ground truth is evaluated on image metrics only, its pixel metrics None. Importable
without torch (the model comes in as an argument), so that saved results and reports load fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from gaussad.calibration import (
    ScoreShift,
    Threshold,
    check_rate,
    f1_threshold,
    quantile_threshold,
    score_shift,
)
from gaussad.config import describe_size
from gaussad.decisions import image_errors
from gaussad.errors import GaussADError
from gaussad.framing import describe_crop
from gaussad.images import DEFAULT_MAX_PIXELS, open_image
from gaussad.layout import LabeledImage, has_masks, list_test_images, training_images
from gaussad.metrics import image_auroc, pixel_metrics
from gaussad.selection import summary

if TYPE_CHECKING:
    from gaussad.features import ImageError
    from gaussad.model import GaussAD

STORED_SIDE = 256  # side of the maps and masks kept for reports and saved results


@dataclass
class CategoryResult:
    category: str
    image_auroc: float
    pixel_auroc: float | None  # None without ground-truth masks (image metrics only)
    aupro: float | None
    n_train: int
    n_test: int
    fit_seconds: float
    test_seconds: float
    test_images_per_second: float
    image_threshold: float | None = None  # the model's own (label-free) threshold, if it has one
    false_alarm_rate: float | None = None  # share of good test images flagged at that threshold
    miss_rate: float | None = None  # share of defective test images not flagged
    # How the good test images' scores stand against the held-out scores that set that threshold
    # (`calibration.score_shift`): the probability that one outscores a held-out training image, and the
    # one-sided p-value of no shift upwards.
    good_shift: float | None = None
    good_shift_p_value: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class CategoryPredictions:
    """What a category's evaluation saw and predicted, for reports: maps and ground-truth masks in the
    order of the images, at one size per image (STORED_SIDE square as evaluations keep them), or none;
    no masks either for a category without ground truth."""

    images: list[LabeledImage]
    scores: np.ndarray
    maps: list[np.ndarray]
    masks: list[np.ndarray]


@dataclass
class CategoryEvaluation:
    """A category's metrics and predictions with the thresholds of the model fitted on it: the model
    itself is not kept, so evaluating many categories holds one model at a time."""

    result: CategoryResult
    predictions: CategoryPredictions
    image_threshold: Threshold | None
    pixel_threshold: Threshold | None
    model_info: dict  # `model_info` of the fitted model
    # Unreadable training and test images left out (the model's on_error="skip"), in that order.
    skipped: list[ImageError] = field(default_factory=list)
    # The names of the training images that scored far above the others (`GaussAD.far_out_among`).
    far_out: list[str] = field(default_factory=list)
    # How the fit chose its auto options, or which rule decided them (`FittedState.selection`).
    selection: dict = field(default_factory=dict)


def read_mask(image: LabeledImage, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The boolean ground truth (height, width) of a test image; all False for a good one. A mask file
    is read within the same pixel limit as images. A defective image without a mask is an error: all
    False would be wrong ground truth."""
    if image.mask_path is None:
        if image.label:
            raise GaussADError(f"{image.path}: defective test image without a ground-truth mask")
        return np.zeros(size, dtype=bool)
    mask = open_image(image.mask_path, max_pixels).convert("L")
    if mask.size != (size[1], size[0]):
        mask = mask.resize((size[1], size[0]), Image.Resampling.NEAREST)
    return np.asarray(mask) > 127


def evaluate_category(
    make_model: Callable[[], GaussAD], category: Path, eval_size: int | None = None, keep_maps: bool = False
) -> CategoryEvaluation:
    """Fit a fresh model on a category's train/good and measure it on its test set.

    Pixel metrics are computed at the maps' full size (each image's own, or eval_size square); those maps
    are let go on return, as is the model. Without ground-truth masks they are None (image metrics only).
    With keep_maps, the maps and ground truths are kept at STORED_SIDE square for reports and saved
    results; without, only the scores are.
    """
    train = training_images(category)
    tests = list_test_images(category)
    model = make_model()
    started = time.perf_counter()
    model.fit(train)
    fit_seconds = time.perf_counter() - started

    kept, scores, maps, test_errors, test_seconds = _predict_tests(model, tests, eval_size)
    if test_errors:
        tests = [tests[index] for index in kept]
        if len({image.label for image in tests}) < 2:
            raise GaussADError(
                f"{category / 'test'}: too few readable test images to evaluate (needs good and defective)"
            )
    masks = _read_masks(tests, maps, model.max_pixels) if has_masks(tests) else []
    labels = np.array([image.label for image in tests])
    pixel_auroc, aupro = pixel_metrics(masks, maps) if masks else (None, None)
    result = CategoryResult(
        category=category.name,
        image_auroc=image_auroc(labels, scores),
        pixel_auroc=pixel_auroc,
        aupro=aupro,
        n_train=model.n_train_,
        n_test=len(tests),
        fit_seconds=fit_seconds,
        test_seconds=test_seconds,
        test_images_per_second=len(tests) / test_seconds,
        **_decisions(model.image_threshold_, labels, scores),
        **_good_shift(model, scores[labels == 0]),
    )
    kept_maps = [stored_size(m) for m in maps] if keep_maps else []
    kept_masks = [stored_size(m) for m in masks] if keep_maps else []
    return CategoryEvaluation(
        result,
        CategoryPredictions(tests, scores, kept_maps, kept_masks),
        model.image_threshold_,
        model.pixel_threshold_,
        model_info(model),
        [*model.skipped_, *test_errors],
        [path.name for path in model.far_out_among(train)],
        model.state_.selection or {},
    )


def _read_masks(tests: list[LabeledImage], maps: list[np.ndarray], max_pixels: int) -> list[np.ndarray]:
    """The ground truth of each test image at the size of its map."""
    return [read_mask(image, each.shape, max_pixels) for image, each in zip(tests, maps, strict=True)]


def _predict_tests(
    model: GaussAD, tests: list[LabeledImage], eval_size: int | None
) -> tuple[list[int], np.ndarray, list[np.ndarray], list[ImageError], float]:
    """The positions among `tests` of the images scored, their scores and maps (each at its image's size,
    or eval_size square), the images skipped (the model's on_error="skip"), and the seconds it took."""
    map_sizes = None if eval_size is None else [(eval_size, eval_size)] * len(tests)
    started = time.perf_counter()
    kept, scores, maps, errors = [], [np.empty(0)], [], []
    # Closed on any error: the generator's progress bar ends its line before the error is printed.
    with closing(model.iter_predict([t.path for t in tests], map_sizes=map_sizes)) as batches:
        for batch in batches:
            kept += batch.indices
            scores.append(batch.scores)
            maps += batch.maps
            errors += batch.errors
    return kept, np.concatenate(scores), maps, errors, time.perf_counter() - started


def _decisions(image_threshold: Threshold | None, labels: np.ndarray, scores: np.ndarray) -> dict:
    """CategoryResult's threshold, false-alarm and miss rates; nothing without a threshold."""
    if image_threshold is None:
        return {}
    errors = image_errors(labels, scores, image_threshold.value)
    return {
        "image_threshold": image_threshold.value,
        "false_alarm_rate": errors.false_alarm_rate,
        "miss_rate": errors.miss_rate,
    }


def _good_shift(model: GaussAD, good_scores: np.ndarray) -> dict:
    """CategoryResult's shift of the good test images' scores from the held-out scores of the training
    images that set the freshly fitted model's label-free threshold (all but the far-out ones); nothing
    without them (no folds, no threshold)."""
    shift = score_shift(model.threshold_scores_, good_scores)
    return {} if shift is None else {"good_shift": shift.auroc, "good_shift_p_value": shift.p_value}


def describe_good_shift(result: CategoryResult) -> str | None:
    """Where a category's good test images score above its training images' held-out scores beyond chance
    (`calibration.ScoreShift.significant`), that, in words, with the false alarms it costs; else None."""
    if result.good_shift is None or not ScoreShift(result.good_shift, result.good_shift_p_value).significant:
        return None
    return (
        f"the good test images score above the training images' held-out scores (a good test image outscores "
        f"a held-out one with probability {result.good_shift:.2f}; one-sided Mann-Whitney p = "
        f"{result.good_shift_p_value:.2g}): "
        "the label-free threshold's false-alarm target holds for images like the training images, and it "
        f"flags {result.false_alarm_rate:.1%} of these"
    )


def stored_size(values: np.ndarray, side: int = STORED_SIDE) -> np.ndarray:
    """A map (bilinear, float32) or mask (nearest, bool) resized to side x side, as reports keep them."""
    if values.shape == (side, side):
        return values
    if values.dtype == bool:
        image = Image.fromarray(values.astype(np.uint8) * 255, "L")
        return np.asarray(image.resize((side, side), Image.Resampling.NEAREST)) > 127
    image = Image.fromarray(values.astype(np.float32), "F")
    return np.asarray(image.resize((side, side), Image.Resampling.BILINEAR))


def model_info(model: GaussAD) -> dict:
    """What reports show about a fitted model: backbone, weights, input size, crop, levels, components, and
    the hybrid map's mixtures."""
    rows = model.describe_levels()
    clusters = {f"{r['role']} {r['level']}": r["clusters"] for r in rows if "clusters" in r}
    return {
        "backbone": model.backbone_.name,
        "weights": f"{model.backbone_.weights_source} (SHA-256 {model.backbone_.weights_sha256})",
        "input size": describe_size(model.image_size_),
        "crop": describe_crop(model.crop_),
        "levels (image score)": list(model.levels_),
        "levels (map)": list(model.map_levels_),
        "levels (score map)": list(model.state_.score_map_levels),
        "levels (position)": list(model.position_levels_),
        "levels (global)": list(model.state_.global_levels),
        "image score": model.state_.image_score,
        "localization": model.state_.localization,
        "components per level": {f"{r['role']} {r['level']}": r["components"] for r in rows},
        **({"mixture clusters per level": clusters} if clusters else {}),
        **summary(model.state_.selection),
    }


def mean_metrics(results: Sequence[CategoryResult]) -> dict[str, float | None]:
    """Each metric's mean over the categories that have it (pixel metrics need ground truth); None where
    none has."""
    means: dict[str, float | None] = {}
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        values = [value for result in results if (value := getattr(result, key)) is not None]
        means[key] = float(np.mean(values)) if values else None
    return means


def calibrate_on_labeled(
    model: GaussAD, category: Path, max_false_alarm_rate: float | None = None, eval_size: int = 256
) -> tuple[Threshold, Threshold | None]:
    """Image and pixel thresholds from labelled data in MVTec layout (its test/ and ground_truth/).

    F1-optimal by default (pixel F1 over all pixels at eval_size x eval_size); with a false-alarm rate, the
    quantiles of the good images' scores and map maxima instead. Pixel F1 needs ground-truth masks: without
    them the pixel threshold returned is the model's own, unchanged (the false-alarm rate needs none).
    """
    images = list_test_images(category)
    kept, scores, maps, _, _ = _predict_tests(model, images, eval_size)
    images = [images[index] for index in kept]
    labels = np.array([image.label for image in images])
    where = f"{len(images)} labelled images in {category}"
    if max_false_alarm_rate is None:
        image = f1_threshold(labels, scores, f"F1-optimal on {where}")
        if not has_masks(images):
            return image, model.pixel_threshold_
        size = (eval_size, eval_size)
        masks = np.stack([read_mask(labeled, size, model.max_pixels) for labeled in images])
        return image, f1_threshold(masks.ravel(), np.stack(maps).ravel(), f"pixel F1-optimal on {where}")
    good = labels == 0
    return _rate_thresholds(
        scores[good],
        [m for m, g in zip(maps, good, strict=True) if g],
        max_false_alarm_rate,
        f"the good images among {where}",
    )


def calibrate_on_good(
    model: GaussAD, images: Sequence[Path], max_false_alarm_rate: float, eval_size: int = 256
) -> tuple[Threshold, Threshold]:
    """Image and pixel thresholds that flag `max_false_alarm_rate` of images known to be good (a line's
    recent good parts, say, where they no longer score like the training images): the quantiles of their
    scores and map maxima. Unreadable images stop it or are left out, as the model's `on_error` says."""
    check_rate(max_false_alarm_rate)  # before the images are scored
    kept, scores, maps, _, _ = _predict_tests(
        model, [LabeledImage(path, "good", None) for path in images], eval_size
    )
    if len(kept) < 2:
        raise GaussADError(f"{len(kept)} readable good images: too few to set a threshold on")
    folders = sorted({str(Path(images[index]).parent) for index in kept})
    where = f"{len(kept)} good images in {', '.join(folders[:3])}{' and more' if len(folders) > 3 else ''}"
    return _rate_thresholds(scores, maps, max_false_alarm_rate, where)


def _rate_thresholds(
    scores: np.ndarray, maps: Sequence[np.ndarray], rate: float, where: str
) -> tuple[Threshold, Threshold]:
    """The image and pixel thresholds that flag `rate` of good images: the quantiles of their scores and
    map maxima; the pixel threshold's normal level, the median of their maps' medians."""
    source = f"{1 - rate:.4g} quantile of {where}"
    image = quantile_threshold(scores, rate, "false-alarm-rate", f"scores: {source}")
    pixel = quantile_threshold(
        np.array([m.max() for m in maps]), rate, "false-alarm-rate", f"map maxima: {source}"
    )
    pixel.normal_level = float(np.median([np.median(m) for m in maps]))
    return image, pixel
