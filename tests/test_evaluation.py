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
from gaussad.calibration import Threshold
from gaussad.errors import GaussADError
from gaussad.evaluation import (
    STORED_SIDE,
    evaluate_category,
    find_category,
    list_test_images,
    read_mask,
    stored_size,
)
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
    # The test images are read once, by the model's batches; besides them only the masks are.
    read = sorted(path for path in opened if "ground_truth" not in path.parts)
    tests = [image.path for image in list_test_images(category)]
    assert read == sorted([*tests, *(category / "train" / "good").iterdir()])
    assert evaluation.predictions.maps == [] and evaluation.predictions.masks == []
    assert len(evaluation.predictions.scores) == len(evaluation.predictions.images) == 8
    assert isinstance(evaluation.image_threshold, Threshold) and isinstance(
        evaluation.pixel_threshold, Threshold
    )
    assert not any(isinstance(value, GaussAD) for value in vars(evaluation).values())
    assert evaluation.model_info["levels (map)"] == [2, 3] and evaluation.model_info["input size"] == 64
    result = evaluation.result
    assert result.image_threshold == evaluation.image_threshold.value
    assert (result.n_train, result.n_test, result.image_auroc, result.miss_rate) == (16, 8, 1.0, 0.0)
    assert 0.8 < result.pixel_auroc <= 1.0


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
