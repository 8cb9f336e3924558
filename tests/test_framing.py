"""The window around the part: how it is learnt and placed, and that every path scores through it alike."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import fit_small, marked_texture, texture
from PIL import Image

from gaussad import GaussAD
from gaussad.cli import main
from gaussad.evaluation import model_info
from gaussad.framing import (
    CROP_MARGIN,
    MAX_WINDOW_SHARE,
    Crop,
    Window,
    crop_ruled_out,
    frame,
    framed,
    learn_crop,
    map_in_image,
    part_box,
    part_region,
    part_window,
    parts_move,
)

SIDE = 96
RADIUS = 16  # the part's diameter is a third of the frame


def part_on_table(
    rng: np.random.Generator, defect: bool = False, radius: int = RADIUS
) -> tuple[np.ndarray, tuple[int, int]]:
    """A textured disk (the part) at a random place on a plain grey table, and its centre; with `defect`, a
    bright scratch across the part's middle."""
    image = np.clip(rng.normal(90, 2, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
    row, column = (int(v) for v in rng.integers(radius + 2, SIDE - radius - 2, size=2))
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    disk = (y - row) ** 2 + (x - column) ** 2 <= radius**2
    image[disk] = texture(rng, SIDE)[disk]
    if defect:
        image[row - 2 : row + 2, column - 8 : column + 8] = (250, 40, 40)
    return image, (row, column)


def test_the_window_is_the_largest_part_with_a_margin_and_none_where_it_would_not_pay() -> None:
    small = [(0.3, 0.6, 0.1, 0.4), (0.5, 0.7, 0.2, 0.6)]  # extents (0.3, 0.3) and (0.2, 0.4)
    height, width, centre = learn_crop(small)
    assert (height, width) == pytest.approx((CROP_MARGIN * 0.3, CROP_MARGIN * 0.4))
    assert centre is None  # the parts move: the window follows each one
    # One axis the part fills, the other it does not: only that one is cut.
    assert learn_crop([(0.0, 1.0, 0.2, 0.5)])[:2] == pytest.approx((1.0, CROP_MARGIN * 0.3))
    # Nearly the whole frame on both axes, parts found on too few images, or none: no window.
    assert learn_crop([(0.0, MAX_WINDOW_SHARE, 0.05, 0.95)]) is None
    assert learn_crop([*small, None]) is None
    assert learn_crop([None] * 4) is None and learn_crop([]) is None
    assert learn_crop([*small * 5, None]) is not None  # one of eleven not found
    # What a fit's first images already rule out, more images cannot bring back: it stops finding parts.
    assert crop_ruled_out([(0.0, 0.95, 0.0, 0.9)], 100) and crop_ruled_out([None] * 11, 100)
    assert not crop_ruled_out([None] * 10, 100) and not crop_ruled_out([*small, None], 100)


def test_parts_move_about_where_found_on_half_the_images_and_a_window_would_follow_them() -> None:
    moving = [(0.1, 0.4, 0.1, 0.4), (0.5, 0.8, 0.5, 0.8)]
    still = [(0.30 + d, 0.60 + d, 0.20 - d, 0.50 - d) for d in (0.0, 0.01, -0.01, 0.005)]
    # Found on two of three images: too few for a window, enough to see them move.
    assert learn_crop([*moving, None]) is None and parts_move([*moving, None])
    assert parts_move(moving) and not parts_move(still) and not parts_move([*still, None])
    # Found on fewer than half (a texture's marks), or spanning the frame: nothing to say.
    assert not parts_move([*moving, None, None, None])
    assert not parts_move([(0.0, 0.95, 0.0, 0.9), (0.05, 0.95, 0.1, 0.95)])


def test_parts_that_sit_still_keep_one_window_in_every_image() -> None:
    # Aligned parts, as the finder sees them: a pixel or two apart. One window at their median centre
    # holds them all, so it stays there rather than follow the finder's jitter.
    still = [(0.30 + d, 0.60 + d, 0.20 - d, 0.50 - d) for d in (0.0, 0.01, -0.01, 0.005)]
    height, width, centre = learn_crop(still)
    assert centre == pytest.approx((0.4525, 0.3475)) and height == pytest.approx(CROP_MARGIN * 0.3)
    assert part_window((100, 200), (0.0, 0.3, 0.0, 0.3), learn_crop(still)) == Window(29, 36, 33, 66)
    # Parts that move by more than the window's margin: it follows each one.
    assert learn_crop([*still, (0.5, 0.8, 0.2, 0.5)]).centre is None
    # A fixed centre is moved so that the window lies inside the image.
    assert learn_crop([(0.0, 0.3, 0.0, 0.3)] * 3).centre == pytest.approx((0.165, 0.165))
    # Saved and read back; a malformed one is refused.
    moving = learn_crop([*still, (0.5, 0.8, 0.2, 0.5)])
    for crop in (learn_crop(still), moving):
        assert Crop.from_json(json.loads(json.dumps(crop.as_json()))) == crop
    assert Crop.from_json(None) is None
    for bad in ([0.5, 0.5], {"height": 0.5, "width": 0.0, "centre": None}, {"height": 2, "width": 0.5}):
        with pytest.raises(ValueError):
            Crop.from_json(bad)
    with pytest.raises(ValueError, match="centre"):
        Crop.from_json({"height": 0.5, "width": 0.5, "centre": [0.5]})


def test_the_window_centres_on_the_part_and_stays_inside_the_image() -> None:
    crop = Crop(0.3, 0.2)
    assert part_window((100, 200), (0.4, 0.6, 0.4, 0.6), crop) == Window(35, 80, 30, 40)
    assert part_window((100, 200), (0.0, 0.1, 0.9, 1.0), crop) == Window(0, 160, 30, 40)
    assert part_window((100, 200), None, crop) == Window(35, 80, 30, 40)  # not found: the centre
    assert Window(35, 80, 30, 40).scaled((100, 200), (50, 100)) == Window(18, 40, 15, 20)
    assert Window(0, 0, 3, 3).scaled((3, 3), (1, 1)) == Window(0, 0, 1, 1)  # never empty


def test_a_map_goes_back_to_its_window_and_is_lowest_elsewhere() -> None:
    window_map = np.arange(6, dtype=np.float32).reshape(2, 3) + 1
    placed = framed(window_map, Window(1, 2, 2, 3), (4, 6))
    np.testing.assert_array_equal(placed[1:3, 2:5], window_map)
    placed[1:3, 2:5] = 1.0
    assert (placed == 1.0).all()
    assert framed(window_map, Window.whole((2, 3)), (2, 3)) is window_map
    # At another size, the map is resized to the window's place there.
    doubled = map_in_image(window_map, Window(1, 2, 2, 3), (4, 6), (8, 12), lambda m, s: np.full(s, m.max()))
    assert doubled.shape == (8, 12) and (doubled[2:6, 4:10] == 6).all() and (doubled[:2] == 6).all()


def test_the_part_is_found_on_a_plain_table_and_not_in_a_texture() -> None:
    rng = np.random.default_rng(0)
    image, (row, column) = part_on_table(rng)
    top, bottom, left, right = (round(v * SIDE) for v in part_box(image))
    # The part's box, widened a little by the smoothing that finds it.
    assert 0 <= row - RADIUS - top <= 6 and 0 <= bottom - (row + RADIUS + 1) <= 6
    assert 0 <= column - RADIUS - left <= 6 and 0 <= right - (column + RADIUS + 1) <= 6
    assert part_box(texture(rng, SIDE)) is None
    # A part of 3% of the frame is still a part for the window, though too small to hold synthetic defects.
    tiny, _ = part_on_table(rng, radius=9)
    assert part_box(tiny) is not None and part_region(tiny) is None
    # Marks on a texture are no part: a dark disc beside a bright bar, each unlike the border, holds too
    # little of what is unlike it.
    marked = marked_texture(rng, SIDE)
    assert part_region(marked, min_share=0.02) is not None and part_box(marked) is None
    cut, window = frame(image, Crop(0.5, 0.5))
    assert cut.shape == (48, 48, 3) and window.top <= row - RADIUS and window.left <= column - RADIUS
    np.testing.assert_array_equal(frame(image, None)[0], image)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path], list[tuple[int, int]]]:
    """Sixteen good parts to train on; four good and four scratched ones to test, with their centres."""
    folder = tmp_path_factory.mktemp("parts")
    rng = np.random.default_rng(1)
    train, tests, centres = [], [], []
    for index in range(24):
        image, centre = part_on_table(rng, defect=index >= 20)
        path = folder / f"{index:02d}.png"
        Image.fromarray(image).save(path)
        (train if index < 16 else tests).append(path)
        if index >= 16:
            centres.append(centre)
    return train, tests, centres


@pytest.fixture(scope="module")
def cropped(parts) -> GaussAD:
    return fit_small(parts[0], localization="shared")


def test_a_model_learns_the_window_of_parts_on_a_table_and_maps_whole_images(cropped: GaussAD, parts) -> None:
    _, tests, centres = parts
    height, width, centre = cropped.crop_
    # The largest part's box (widened by up to 6 pixels a side, as above) with the margin, following
    # each part.
    assert height == width and centre is None
    assert CROP_MARGIN * (2 * RADIUS + 1) / SIDE <= height <= CROP_MARGIN * (2 * RADIUS + 13) / SIDE
    prediction = cropped.predict(tests)
    for anomaly_map, (row, column) in zip(prediction.maps, centres, strict=True):
        assert anomaly_map.shape == (SIDE, SIDE)
        # Far from the part, outside any window around it, the map is at its lowest.
        far = np.hypot(*np.mgrid[0:SIDE, 0:SIDE] - np.array([row, column])[:, None, None]) > SIDE * height
        assert np.all(anomaly_map[far] == anomaly_map.min())
    for anomaly_map, (row, column) in zip(prediction.maps[4:], centres[4:], strict=True):
        peak = np.unravel_index(np.argmax(anomaly_map), anomaly_map.shape)
        assert abs(peak[0] - row) <= 6 and abs(peak[1] - column) <= 10  # on the scratch
    assert prediction.scores[4:].min() > prediction.scores[:4].max()
    assert fit_small(parts[0], localization="shared", crop="none").crop_ is None


def test_a_saved_model_keeps_its_window_and_every_runtime_frames_alike(
    cropped: GaussAD, parts, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    from gaussad.export import export_onnx
    from gaussad.runtime import OnnxModel
    from gaussad.serve.runtime import load_served_model

    _, tests, _ = parts
    folder = cropped.save(tmp_path / "model")
    loaded = GaussAD.load(folder, device="cpu")
    assert loaded.crop_ == cropped.crop_
    expected = cropped.predict(tests)
    found = loaded.predict(tests)
    np.testing.assert_array_equal(found.scores, expected.scores)
    exported = export_onnx(folder, tmp_path / "model.onnx")
    runtime = OnnxModel.load(exported)
    assert runtime.crop_ == pytest.approx(cropped.crop_)
    onnx = runtime.predict(tests)
    np.testing.assert_allclose(onnx.scores, expected.scores, rtol=1e-4)
    for got, want in zip(onnx.maps, expected.maps, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.ptp(want))
    # The service's two runtimes: prepare, score and place each map as prediction does.
    pixels = [np.asarray(Image.open(path).convert("RGB")) for path in tests]
    for path in (folder, exported):
        served = load_served_model("parts", path, "cpu")
        prepared = [served.prepare(image) for image in pixels]
        scores, maps = served.score(np.stack([inputs for inputs, _ in prepared]), with_maps=True)
        np.testing.assert_allclose(scores, expected.scores, rtol=1e-4)
        for anomaly_map, (_, window), want in zip(maps, prepared, expected.maps, strict=True):
            placed = served.full_size_map(anomaly_map, (SIDE, SIDE), window)
            np.testing.assert_allclose(placed, want, rtol=0, atol=1e-3 * np.ptp(want))


def test_parts_that_move_take_shared_maps_and_a_combined_score_without_the_grid(
    parts, tmp_path: Path, capsys
) -> None:
    """Parts that move about (a window follows each one, or would where too few are found for one): the
    auto localization weighs no per-position Gaussian, the combined image score joins the score map's top
    share with the whole frame's pooling (the global part's levels) in place of the grid, each says why,
    and the model holds no per-position Gaussian."""
    _, tests, _ = parts
    auto = fit_small(parts[0])
    assert auto.crop_.centre is None and auto.state_.localization == "shared"
    assert auto.state_.position_gaussian is None and auto.position_levels_ == ()
    localization = auto.state_.selection["localization"]
    assert list(localization["candidates"]) == ["shared"]
    assert "parts found move about" in localization["rule"]
    whole_frame = (3, 4, 5, 6, 7)  # the global part's levels, the paper's
    state = auto.state_
    assert state.image_score == "combined" and state.global_levels == ()
    assert (auto.levels_, state.image_grid) == (whole_frame, 1)
    assert state.selection["image_score"]["rule"].startswith("combined without the grid")
    # Shown by `gaussad info` and in reports.
    assert main(["info", str(auto.save(tmp_path / "model"))]) == 0
    printed = capsys.readouterr().out
    assert "image score: combined; levels 3,4,5,6,7; grid 1 x 1; score map levels 3,4,5,6,7" in printed
    assert "localization by rule: shared: the parts" in printed
    assert "image score by rule: combined without the grid" in printed
    assert model_info(auto)["image score (rule)"] == state.selection["image_score"]["rule"]
    # The sum of the two parts asked for alone (whose rule is the localization's alone), each over the
    # spread of its held-out scores.
    map_part = fit_small(parts[0], image_score="map")
    pooled_part = fit_small(parts[0], image_score="pooled", levels=whole_frame, image_grid=1)
    assert "image_score" not in map_part.state_.selection | pooled_part.state_.selection
    spreads = [np.std(part.held_out_scores_) for part in (pooled_part, map_part)]
    np.testing.assert_allclose(state.score_scales, spreads, rtol=1e-9)
    expected = pooled_part.score_samples(tests) / spreads[0] + map_part.score_samples(tests) / spreads[1]
    np.testing.assert_allclose(auto.score_samples(tests), expected, rtol=1e-6)
    # A pooled score asked for stays pooled; without a global part, the score map's top share is alone.
    assert fit_small(parts[0], image_score="pooled").state_.image_score == "pooled"
    alone = fit_small(parts[0], global_levels=()).state_
    assert alone.image_score == "map" and alone.selection["image_score"]["rule"].startswith("map: the parts")
    # Without the window the same parts weigh both maps and keep the combined score.
    whole = fit_small(parts[0], crop="none").state_
    assert set(whole.selection["localization"]["candidates"]) == {"shared", "hybrid"}
    assert "rule" not in whole.selection["localization"] and whole.image_score == "combined"
    # Parts found on too few images for a window (12 of 16) that move about: shared maps all the same.
    rng = np.random.default_rng(2)
    tables = []
    for index in range(4):
        table = np.clip(rng.normal(90, 2, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
        tables.append(tmp_path / f"table{index}.png")
        Image.fromarray(table).save(tables[-1])
    unwindowed = fit_small([*parts[0][:12], *tables])
    assert unwindowed.crop_ is None and unwindowed.state_.localization == "shared"
    assert unwindowed.state_.image_score == "combined" and unwindowed.state_.image_grid == 1
    assert unwindowed.state_.selection["localization"]["rule"] == localization["rule"]
    # Without folds there is no choice to make: the fallback's hybrid maps, as its reason says.
    unfolded = fit_small(parts[0], folds=0)
    assert unfolded.crop_ == auto.crop_ and unfolded.state_.localization == "hybrid"
    assert unfolded.state_.image_score == "pooled"
    assert "localization hybrid" in unfolded.state_.selection["fallback"]
