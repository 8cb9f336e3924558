"""Evaluation on data in MVTec AD layout: fit on train/good, score test/, compare with ground truth.

Layout of a category: train/good/*, test/<type>/* (good or a defect type),
ground_truth/<type>/<stem>_mask.png.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from gaussad.calibration import Threshold, f1_threshold, quantile_threshold, rates
from gaussad.errors import GaussADError
from gaussad.images import IMAGE_EXTENSIONS
from gaussad.metrics import image_auroc, pixel_metrics
from gaussad.model import GaussAD


@dataclass
class LabeledImage:
    path: Path
    defect: str  # "good" or the defect type
    mask_path: Path | None

    @property
    def label(self) -> int:
        return int(self.defect != "good")


@dataclass
class CategoryResult:
    category: str
    image_auroc: float
    pixel_auroc: float
    aupro: float
    n_train: int
    n_test: int
    fit_seconds: float
    test_seconds: float
    test_images_per_second: float
    image_threshold: float | None = None  # the model's own (label-free) threshold, if it has one
    false_alarm_rate: float | None = None  # share of good test images flagged at that threshold
    miss_rate: float | None = None  # share of defective test images not flagged

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class CategoryPredictions:
    """What a category's evaluation saw and predicted: kept for reports."""

    images: list[LabeledImage]
    scores: np.ndarray
    maps: list[np.ndarray]
    masks: list[np.ndarray]
    model: GaussAD | None = None  # the fitted model, with its thresholds


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def is_category(folder: Path) -> bool:
    return (folder / "train" / "good").is_dir() and (folder / "test").is_dir()


def find_categories(root: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """The category folders under root: root itself if it is one, else its sub-folders that are."""
    root = Path(root)
    if not root.is_dir():
        raise GaussADError(f"{root}: no such folder")
    found = (
        [root] if is_category(root) else sorted(p for p in root.iterdir() if p.is_dir() and is_category(p))
    )
    if not found:
        raise GaussADError(
            f"{root}: not in MVTec layout (no train/good and test/ here or in its sub-folders)"
        )
    if names:
        by_name = {p.name: p for p in found}
        missing = [name for name in names if name not in by_name]
        if missing:
            raise GaussADError(
                f"{root}: no category {', '.join(missing)} (found {', '.join(sorted(by_name))})"
            )
        found = [by_name[name] for name in names]
    return found


def training_images(category: Path) -> list[Path]:
    images = _images_in(category / "train" / "good")
    if not images:
        raise GaussADError(f"{category / 'train' / 'good'}: no training images")
    return images


def list_test_images(category: Path) -> list[LabeledImage]:
    """Every test image with its defect type and mask; a defective image without a mask is an error."""
    found: list[LabeledImage] = []
    for defect_dir in sorted(p for p in (category / "test").iterdir() if p.is_dir()):
        for path in _images_in(defect_dir):
            mask_path = None
            if defect_dir.name != "good":
                mask_path = category / "ground_truth" / defect_dir.name / f"{path.stem}_mask.png"
                if not mask_path.is_file():
                    raise GaussADError(f"{path}: defective test image without its mask {mask_path}")
            found.append(LabeledImage(path, defect_dir.name, mask_path))
    if not found:
        raise GaussADError(f"{category / 'test'}: no test images")
    if len({image.label for image in found}) < 2:
        raise GaussADError(f"{category / 'test'}: needs both good and defective images to evaluate")
    return found


def read_mask(image: LabeledImage, size: tuple[int, int]) -> np.ndarray:
    """The boolean ground truth (height, width) of a test image; all False for a good one."""
    if image.mask_path is None:
        return np.zeros(size, dtype=bool)
    try:
        with Image.open(image.mask_path) as mask:
            mask = mask.convert("L")
            if mask.size != (size[1], size[0]):
                mask = mask.resize((size[1], size[0]), Image.Resampling.NEAREST)
            return np.asarray(mask) > 127
    except OSError as error:
        raise GaussADError(f"{image.mask_path}: cannot read mask ({error})") from None


def evaluate_category(
    make_model: Callable[[], GaussAD], category: Path, eval_size: int | None = None
) -> tuple[CategoryResult, CategoryPredictions]:
    """Fit a fresh model on a category's train/good and measure it on its test set."""
    train = training_images(category)
    tests = list_test_images(category)
    model = make_model()
    started = time.perf_counter()
    model.fit(train)
    fit_seconds = time.perf_counter() - started

    sizes = [_image_size(image.path) for image in tests]
    map_sizes = sizes if eval_size is None else [(eval_size, eval_size)] * len(tests)
    started = time.perf_counter()
    scores, maps = [], []
    for _, batch_scores, batch_maps in model.iter_predict([t.path for t in tests], map_sizes=map_sizes):
        scores.append(batch_scores)
        maps += batch_maps
    test_seconds = time.perf_counter() - started
    scores = np.concatenate(scores)

    masks = [read_mask(image, size) for image, size in zip(tests, map_sizes, strict=True)]
    labels = np.array([image.label for image in tests])
    pixel_auroc, aupro = pixel_metrics(masks, maps)
    decision = {}
    if model.image_threshold_ is not None:
        false_alarms, misses = rates(labels, scores, model.image_threshold_.value)
        decision = {
            "image_threshold": model.image_threshold_.value,
            "false_alarm_rate": false_alarms,
            "miss_rate": misses,
        }
    result = CategoryResult(
        category=category.name,
        image_auroc=image_auroc(labels, scores),
        pixel_auroc=pixel_auroc,
        aupro=aupro,
        n_train=len(train),
        n_test=len(tests),
        fit_seconds=fit_seconds,
        test_seconds=test_seconds,
        test_images_per_second=len(tests) / test_seconds,
        **decision,
    )
    return result, CategoryPredictions(tests, scores, maps, masks, model)


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) as the model sees it (after EXIF rotation), read from the header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except OSError as error:
        raise GaussADError(f"{path}: cannot read image ({error})") from None
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def mean_metrics(results: Sequence[CategoryResult]) -> dict[str, float]:
    return {
        key: float(np.mean([getattr(result, key) for result in results]))
        for key in ("image_auroc", "pixel_auroc", "aupro")
    }


def calibrate_on_labeled(
    model: GaussAD, category: Path, max_false_alarm_rate: float | None = None, eval_size: int = 256
) -> tuple[Threshold, Threshold]:
    """Image and pixel thresholds from labelled data in MVTec layout (its test/ and ground_truth/).

    F1-optimal by default (pixel F1 over all pixels at eval_size x eval_size); with a false-alarm rate, the
    quantiles of the good images' scores and map maxima instead.
    """
    images = list_test_images(category)
    size = (eval_size, eval_size)
    scores, maps = [], []
    for _, batch_scores, batch_maps in model.iter_predict(
        [i.path for i in images], map_sizes=[size] * len(images)
    ):
        scores.append(batch_scores)
        maps += batch_maps
    scores = np.concatenate(scores)
    labels = np.array([image.label for image in images])
    where = f"{len(images)} labelled images in {category}"
    if max_false_alarm_rate is None:
        masks = np.stack([read_mask(image, size) for image in images])
        return (
            f1_threshold(labels, scores, f"F1-optimal on {where}"),
            f1_threshold(masks.ravel(), np.stack(maps).ravel(), f"pixel F1-optimal on {where}"),
        )
    good = labels == 0
    source = f"{1 - max_false_alarm_rate:.4g} quantile of the good images among {where}"
    image = quantile_threshold(scores[good], max_false_alarm_rate, "false-alarm-rate", f"scores: {source}")
    pixel = quantile_threshold(
        np.array([m.max() for m, g in zip(maps, good, strict=True) if g]),
        max_false_alarm_rate,
        "false-alarm-rate",
        f"map maxima: {source}",
    )
    pixel.normal_level = float(np.median([np.median(m) for m, g in zip(maps, good, strict=True) if g]))
    return image, pixel
