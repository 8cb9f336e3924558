"""`feature_store`: where the fit keeps the training features (disk, memory) or runs the backbone again
(none), with the same model."""

import numpy as np
import pytest
from conftest import assert_same_model, fit_small, make_category

from gaussad import GaussAD, model
from gaussad.cli import main
from gaussad.errors import GaussADError
from gaussad.fitpass import Extractor, FitPlan, HeldLevel, replayed, run_pass
from gaussad.layout import list_test_images, training_images


@pytest.fixture(scope="module")
def widgets(tmp_path_factory):
    return make_category(tmp_path_factory.mktemp("stores") / "widget", n_train=24, seed=5)


def fit(images: list, feature_store: str, **options) -> GaussAD:
    return fit_small(images, feature_store=feature_store, **options)


@pytest.mark.parametrize(
    "options",
    [{}, {"localization": "per-position", "image_score": "auto", "folds": 3}],
    ids=["defaults", "per-position-auto"],
)
def test_every_feature_store_gives_the_same_model(widgets, torch_threads, monkeypatch, options) -> None:
    torch_threads(1)
    images = training_images(widgets)
    tests = [item.path for item in list_test_images(widgets)]
    on_disk = fit(images, "disk", **options)

    def no_disk(prefix: str):
        raise AssertionError("a fit without a disk store made a scratch folder")

    monkeypatch.setattr(model, "scratch_folder", no_disk)
    in_memory = fit(images, "memory", **options)
    without = fit(images, "none", **options)
    np.testing.assert_array_equal(in_memory.held_out_scores_, on_disk.held_out_scores_)
    np.testing.assert_array_equal(in_memory.held_out_map_maxima_, on_disk.held_out_map_maxima_)
    assert_same_model(without, on_disk, tests)
    np.testing.assert_allclose(without.held_out_map_maxima_, on_disk.held_out_map_maxima_, rtol=1e-6)


def test_without_a_store_skipped_images_stay_skipped(widgets, tmp_path, torch_threads) -> None:
    torch_threads(1)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    images = [*training_images(widgets)[:9], broken, *training_images(widgets)[9:]]
    on_disk = fit(images, "disk", on_error="skip")
    without = fit(images, "none", on_error="skip")
    assert [error.name for error in without.skipped_] == [str(broken)]
    assert_same_model(without, on_disk, [item.path for item in list_test_images(widgets)][:3])


def test_an_image_unreadable_on_the_second_pass_is_named(widgets, tmp_path) -> None:
    images = [tmp_path / f"{index}.png" for index in range(6)]
    for source, image in zip(training_images(widgets), images, strict=False):
        image.write_bytes(source.read_bytes())
    extractor = Extractor("efficientnet_lite0", None, (3,), "fp32", 64, "cpu", 4, 1, 10**8)
    plan = FitPlan((3,), (3,), (), {}, False, 2, len(images), frozenset())
    runner = extractor.runner()
    kept = np.arange(6)
    assert [start for start, _ in replayed(plan, runner, images, kept)] == [0, 4]
    assert [start for start, _ in replayed(plan, runner, images[4:], kept, first=4)] == [4]
    images[4].write_bytes(b"truncated")
    with pytest.raises(GaussADError, match=r"4\.png.*changed during the fit"):
        list(replayed(plan, runner, images, kept))


def test_the_pass_keeps_only_the_sampled_images_inputs(widgets) -> None:
    """Each image sampled for synthetic defects is kept as its own copy: a view of its batch's inputs would
    keep every sampled batch alive through the fit (hundreds of MB on thousands of images)."""
    images = training_images(widgets)[:8]
    extractor = Extractor("efficientnet_lite0", None, (3,), "fp32", 64, "cpu", 4, 1, 10**8)
    plan = FitPlan((3,), (3,), (), {}, False, 2, len(images), frozenset({1, 6}))
    levels = {3: HeldLevel(False, 2)}
    result = run_pass(plan, extractor.runner(), images, levels, None, {}, {})
    assert [fold for fold, _ in result.samples] == [0, 1]
    assert all(pixels.shape == (64, 64, 3) and pixels.base is None for _, pixels in result.samples)


def test_feature_store_options_are_checked(widgets, capsys) -> None:
    images = training_images(widgets)[:4]
    with pytest.raises(GaussADError, match="--feature-store 'ssd'"):
        fit(images, "ssd")
    with pytest.raises(SystemExit):
        main(["fit", str(widgets / "train" / "good"), "-o", "unused", "--feature-store", "ssd"])
    assert "invalid choice: 'ssd'" in capsys.readouterr().err


def test_cli_fit_without_a_feature_store(widgets, tmp_path) -> None:
    out = tmp_path / "model"
    argv = ["fit", str(widgets / "train" / "good"), "-o", str(out), "--image-size", "64", "--device", "cpu"]
    assert main([*argv, "--feature-store", "none", "--quiet"]) == 0
    loaded = GaussAD.load(out, device="cpu")
    assert loaded.n_train_ == 24
    assert loaded.image_threshold_ is not None
