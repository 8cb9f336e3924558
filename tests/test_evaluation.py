"""Evaluation streams: full-size maps serve the metrics and are let go; reports get them small."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_category

import gaussad.images
from gaussad import GaussAD
from gaussad.calibration import Threshold, score_shift
from gaussad.errors import GaussADError
from gaussad.evaluation import (
    STORED_SIDE,
    calibrate_on_labeled,
    evaluate_category,
    mean_metrics,
    read_mask,
    stored_size,
)
from gaussad.layout import find_category, has_masks, list_test_images
from gaussad.metrics import pixel_metrics

SMALL = {"image_size": 64, "map_levels": (2, 3), "device": "cpu", "batch_size": 8}


def small_model() -> GaussAD:
    return GaussAD(**SMALL)


def test_without_maps_kept_only_scores_and_thresholds_remain(category: Path, monkeypatch) -> None:
    opened: list[Path] = []
    original_read = gaussad.images._read_source

    def counting_read(source):
        opened.append(Path(source))
        return original_read(source)

    monkeypatch.setattr(gaussad.images, "_read_source", counting_read)
    evaluation = evaluate_category(small_model, category)
    # The test images are read once, by the model's batches; the training images twice: to find their
    # parts for the window (`crop="part"`; all sixteen are in the first batch, which rules a window out
    # for this texture) and by the fit's pass. Besides them only the masks are.
    read = sorted(path for path in opened if "ground_truth" not in path.parts)
    tests = [image.path for image in list_test_images(category)]
    assert read == sorted([*tests, *2 * list((category / "train" / "good").iterdir())])
    assert evaluation.predictions.maps == [] and evaluation.predictions.masks == []
    assert len(evaluation.predictions.scores) == len(evaluation.predictions.images) == 8
    assert isinstance(evaluation.image_threshold, Threshold) and isinstance(
        evaluation.pixel_threshold, Threshold
    )
    assert not any(isinstance(value, GaussAD) for value in vars(evaluation).values())
    assert evaluation.model_info["levels (map)"] == [2, 3] and evaluation.model_info["input size"] == "64 px"
    result = evaluation.result
    assert result.image_threshold == evaluation.image_threshold.value
    assert (result.n_train, result.n_test, result.image_auroc, result.miss_rate) == (16, 8, 1.0, 0.0)
    assert 0.8 < result.pixel_auroc <= 1.0


def test_the_good_test_images_are_compared_with_the_scores_that_set_the_threshold(category: Path) -> None:
    fitted: list[GaussAD] = []
    result = evaluate_category(lambda: fitted.append(small_model()) or fitted[-1], category).result
    model = fitted[0]
    good = [image.path for image in list_test_images(category) if image.label == 0]
    expected = score_shift(model.threshold_scores_, model.score_samples(good))
    assert result.good_shift == pytest.approx(expected.auroc, abs=1e-12)
    assert result.good_shift_p_value == pytest.approx(expected.p_value, rel=1e-9)
    # The threshold is the quantile of those scores: the held-out ones of all but the far-out images.
    assert len(model.threshold_scores_) == len(model.held_out_scores_) - len(model.far_out_training_images_)
    assert model.image_threshold_.value == np.quantile(model.threshold_scores_, 0.99)


def test_kept_maps_and_masks_are_small_and_aligned(category: Path) -> None:
    evaluation = evaluate_category(small_model, category, keep_maps=True)
    predictions = evaluation.predictions
    assert [m.shape for m in predictions.maps] == [(STORED_SIDE, STORED_SIDE)] * 8
    assert all(m.dtype == np.float32 for m in predictions.maps)
    assert all(m.dtype == bool and m.shape == (STORED_SIDE, STORED_SIDE) for m in predictions.masks)
    truth = [read_mask(image, (STORED_SIDE, STORED_SIDE)) for image in list_test_images(category)]
    assert all((kept == expected).all() for kept, expected in zip(predictions.masks, truth, strict=True))
    # The stored maps still localize: their pixel AUROC is close to the full-size one of the result.
    assert pixel_metrics(predictions.masks, predictions.maps)[0] == pytest.approx(
        evaluation.result.pixel_auroc, abs=0.02
    )


def test_stored_size_resizes_maps_smoothly_and_masks_exactly() -> None:
    anomaly_map = np.tile(np.linspace(0.0, 1.0, 96, dtype=np.float32), (48, 1))
    small = stored_size(anomaly_map, side=32)
    assert small.shape == (32, 32) and small.dtype == np.float32 and 0.0 <= small.min() < small.max() <= 1.0
    mask = np.zeros((48, 96), dtype=bool)
    mask[:, 48:] = True
    small_mask = stored_size(mask, side=32)
    assert small_mask.dtype == bool and small_mask[:, :15].sum() == 0 and small_mask[:, 17:].all()
    assert stored_size(small, side=32) is small  # already stored-size: kept as is


def test_find_category_needs_one_or_a_name(tmp_path) -> None:
    for name in ("gadget", "widget"):
        (tmp_path / name / "train" / "good").mkdir(parents=True)
        (tmp_path / name / "test").mkdir()
    with pytest.raises(
        GaussADError, match=r"holds 2 categories \(gadget, widget\); choose one with --category"
    ):
        find_category(tmp_path)
    assert find_category(tmp_path, "widget") == tmp_path / "widget"
    assert find_category(tmp_path / "gadget") == tmp_path / "gadget"
    with pytest.raises(GaussADError, match="no category nothing"):
        find_category(tmp_path, "nothing")


def test_calibrate_refuses_a_root_of_several_categories(category: Path, tmp_path) -> None:
    """Without --category, calibrating on a root of several categories used the first one silently."""
    model = tmp_path / "model"
    small_model().fit(category / "train" / "good").save(model)
    root = tmp_path / "root"
    shutil.copytree(category, root / "widget")  # the session's category stays untouched
    make_category(root / "gadget", n_train=2, n_good=2, n_bad=2, seed=1)
    before = (model / "model.json").read_text()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gaussad.cli",
            "calibrate",
            str(model),
            str(root),
            "--quiet",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"gaussad: error: {root}: holds 2 categories (gadget, widget); choose one with --category NAME"
    )
    assert (model / "model.json").read_text() == before
    arguments = ["calibrate", str(model), str(root), "--category", "widget", "--quiet", "--device", "cpu"]
    subprocess.run([sys.executable, "-m", "gaussad.cli", *arguments], check=True, capture_output=True)
    assert f"labelled images in {root / 'widget'}" in (model / "model.json").read_text()


def image_only(category: Path, target: Path) -> Path:
    """A copy of a category without its ground_truth folder."""
    return Path(shutil.copytree(category, target, ignore=shutil.ignore_patterns("ground_truth")))


def test_a_category_without_ground_truth_has_image_metrics_only(category: Path, tmp_path) -> None:
    plain = image_only(category, tmp_path / "plain")
    images = list_test_images(plain)
    assert [image.mask_path for image in images] == [None] * 8 and not has_masks(images)
    with_masks = evaluate_category(small_model, category, keep_maps=True)
    without = evaluate_category(small_model, plain, keep_maps=True)
    result, expected = without.result, with_masks.result
    assert result.pixel_auroc is None and result.aupro is None and expected.aupro is not None
    # The same training and test images: the same scores, image AUROC, thresholds and decisions.
    np.testing.assert_allclose(without.predictions.scores, with_masks.predictions.scores, rtol=1e-6)
    assert result.image_auroc == pytest.approx(expected.image_auroc, abs=1e-9)
    assert result.image_threshold == pytest.approx(expected.image_threshold)
    assert (result.false_alarm_rate, result.miss_rate) == (expected.false_alarm_rate, expected.miss_rate)
    assert without.pixel_threshold is not None  # label-free: it needs no ground truth
    assert len(without.predictions.maps) == 8 and without.predictions.masks == []
    means = mean_metrics([expected, result])
    assert means["pixel_auroc"] == expected.pixel_auroc and means["aupro"] == expected.aupro
    assert means["image_auroc"] == pytest.approx((expected.image_auroc + result.image_auroc) / 2)
    assert mean_metrics([result, result])["aupro"] is None


def test_an_empty_ground_truth_folder_means_image_only(category: Path, tmp_path) -> None:
    plain = image_only(category, tmp_path / "plain")
    (plain / "ground_truth" / "scratch").mkdir(parents=True)
    assert not has_masks(list_test_images(plain))


def test_a_partial_ground_truth_names_the_first_missing_mask(category: Path, tmp_path) -> None:
    partial = Path(shutil.copytree(category, tmp_path / "partial"))
    for stem in ("002", "001"):
        (partial / "ground_truth" / "scratch" / f"{stem}_mask.png").unlink()
    missing = partial / "ground_truth" / "scratch" / "001_mask.png"
    message = (
        f"{partial / 'test' / 'scratch' / '001.png'}: defective test image without its mask {missing} "
        "(2 of 4 have theirs: give every mask, or none for image metrics only)"
    )
    with pytest.raises(GaussADError) as error:
        list_test_images(partial)
    assert str(error.value) == message


def test_a_defective_image_without_a_mask_has_no_all_false_ground_truth(category: Path, tmp_path) -> None:
    plain = image_only(category, tmp_path / "plain")
    good, *_, defective = list_test_images(plain)
    assert not read_mask(good, (4, 4)).any()
    with pytest.raises(GaussADError, match=r"scratch/003\.png: defective test image without a ground-truth"):
        read_mask(defective, (4, 4))


def test_calibrating_without_ground_truth_keeps_the_models_pixel_threshold(category: Path, tmp_path) -> None:
    plain = image_only(category, tmp_path / "plain")
    model = small_model().fit(category / "train" / "good")
    image, pixel = calibrate_on_labeled(model, plain)
    expected_image, expected_pixel = calibrate_on_labeled(model, category)
    assert image.method == "f1" and image.value == pytest.approx(expected_image.value)
    assert pixel is model.pixel_threshold_ and pixel != expected_pixel
    # A false-alarm rate needs only the good images: the same thresholds with or without masks.
    by_rate = calibrate_on_labeled(model, plain, max_false_alarm_rate=0.25)
    expected = calibrate_on_labeled(model, category, max_false_alarm_rate=0.25)
    assert [(t.method, t.value, t.normal_level) for t in by_rate] == [
        (t.method, pytest.approx(t.value), pytest.approx(t.normal_level)) for t in expected
    ]
