"""The development data's stress variants (`benchmarks/stress_variants.py`): each transform moves the mask
with the image, repeats by seed, and writes a data set that evaluates as MVTec AD layout."""

from pathlib import Path

import numpy as np
import pytest
from conftest import benchmark_script, make_category
from PIL import Image
from scipy import ndimage

from gaussad.layout import list_test_images, training_images

stress_variants = benchmark_script("stress_variants")

RED = (230, 20, 20)


def _part_with_defect() -> tuple[np.ndarray, np.ndarray]:
    """A 90 x 120 image: a plain grey border, a textured part, and a red square defect with its mask."""
    rng = np.random.default_rng(0)
    image = np.full((90, 120, 3), 128, np.uint8)
    image[10:80, 10:110] = rng.integers(40, 200, (70, 100, 1), dtype=np.uint8)  # grey texture
    mask = np.zeros((90, 120), np.uint8)
    mask[30:50, 60:80] = 255
    image[mask > 0] = RED
    return image, mask


def _red(image: np.ndarray) -> np.ndarray:
    return (image[..., 0] > 150) & (image[..., 1] < 90) & (image[..., 2] < 90)


@pytest.mark.parametrize("variant", stress_variants.VARIANTS)
def test_each_variant_moves_the_mask_with_the_image_and_repeats_by_seed(variant: str) -> None:
    transform = stress_variants.TRANSFORMS[variant]
    image, mask = _part_with_defect()
    for seed in range(5):
        moved_image, moved_mask = transform(image, mask, np.random.default_rng(seed))
        assert moved_image.shape[:2] == moved_mask.shape and moved_image.dtype == np.uint8
        inside, red = moved_mask > 0, _red(moved_image)
        assert inside.sum() > 0
        assert red[inside].mean() > 0.85  # the mask lies on the defect...
        assert inside[red].mean() > 0.85  # ...and the defect in the mask
        again = transform(image, mask, np.random.default_rng(seed))
        np.testing.assert_array_equal(again[0], moved_image)
        np.testing.assert_array_equal(again[1], moved_mask)
        without_mask, none = transform(image, None, np.random.default_rng(seed))
        assert none is None
        if variant not in ("crop", "strip"):  # windows are placed by the mask; the rest move images alike
            np.testing.assert_array_equal(without_mask, moved_image)


def test_light_changes_exposure_and_falloff_keeps_the_mask_and_a_grey_image_grey() -> None:
    image, mask = _part_with_defect()
    grey = np.repeat(image[..., :1], 3, axis=-1)
    border = np.ones(mask.shape, bool)
    border[5:-5, 5:-5] = False  # plain grey (128) before the light
    low, high = stress_variants.LIGHT_FALLOFF / (2 * np.sqrt(2)), stress_variants.LIGHT_FALLOFF / 2
    levels = []
    for seed in range(8):
        lit, kept = stress_variants.light(grey, mask, np.random.default_rng(seed))
        assert kept is mask and lit.shape == grey.shape and lit.dtype == np.uint8
        assert (lit == lit[..., :1]).all()  # a monochrome camera has no white balance
        values = lit[..., 0][border].astype(float)
        assert (1 + low) / (1 - low) - 0.03 < values.max() / values.min() < (1 + high) / (1 - high) + 0.03
        levels.append(values.mean())
        coloured, _ = stress_variants.light(image, mask, np.random.default_rng(seed))
        channels = coloured[border].astype(float).mean(axis=0)
        assert (
            1.0
            < channels.max() / channels.min()
            < (1 + stress_variants.LIGHT_CAST) / (1 - stress_variants.LIGHT_CAST) + 0.01
        )
    assert max(levels) / min(levels) > 1.2  # the exposure changes from image to image


def test_focus_blurs_adds_noise_keeps_the_mask_and_a_grey_image_grey(monkeypatch: pytest.MonkeyPatch) -> None:
    image, mask = _part_with_defect()
    grey = np.repeat(image[..., :1], 3, axis=-1)
    border = np.ones(mask.shape, bool)
    border[5:-5, 5:-5] = False  # plain grey (128) before: its spread is the noise's

    def contrast(pixels: np.ndarray) -> float:  # between neighbours on the textured part
        return float(np.abs(np.diff(pixels[10:80, 10:110, 0].astype(float), axis=1)).mean())

    for seed in range(8):
        focused, kept = stress_variants.focus(grey, mask, np.random.default_rng(seed))
        assert kept is mask and focused.shape == grey.shape and focused.dtype == np.uint8
        assert (focused == focused[..., :1]).all()  # a monochrome camera's noise is grey
        assert focused[..., 0][border].std() < 1.2 * stress_variants.FOCUS_NOISE + 0.5
        coloured, _ = stress_variants.focus(image, mask, np.random.default_rng(seed))
        assert (coloured[border] != coloured[border][:, :1]).any()  # a colour camera's is per channel
    monkeypatch.setattr(stress_variants, "FOCUS_NOISE", 0.0)
    monkeypatch.setattr(stress_variants, "FOCUS_BLUR", 0.05)
    blurred = [
        contrast(stress_variants.focus(grey, mask, np.random.default_rng(seed))[0]) for seed in range(8)
    ]
    assert max(blurred) <= contrast(grey) and np.mean(blurred) < 0.8 * contrast(grey)


def test_crop_keeps_the_whole_defect_in_a_two_to_one_window() -> None:
    image, mask = _part_with_defect()
    for seed in range(8):
        cropped, kept = stress_variants.crop(image, mask, np.random.default_rng(seed))
        height, width = kept.shape
        assert max(height, width) == 2 * min(height, width)
        assert (kept > 0).sum() == (mask > 0).sum()


def test_strip_keeps_the_whole_defect_in_the_same_tall_window() -> None:
    image, mask = _part_with_defect()
    shapes = set()
    for seed in range(8):
        _, kept = stress_variants.strip(image, mask, np.random.default_rng(seed))
        shapes.add(kept.shape)
        assert (kept > 0).sum() == (mask > 0).sum()
    (shape,) = shapes  # one shape for every image: the full height, 2/5 of it wide
    assert shape == (90, int(90 / stress_variants.STRIP_ASPECT))


@pytest.mark.parametrize("variant", ["small", "scene", "posed", "tiny"])
def test_small_scene_posed_and_tiny_shrink_the_part_inside_the_frame(variant: str) -> None:
    image, mask = _part_with_defect()
    low, high = stress_variants.TINY_SCALES if variant == "tiny" else stress_variants.SMALL_SCALES
    for seed in range(8):
        placed, moved = getattr(stress_variants, variant)(image, mask, np.random.default_rng(seed))
        assert placed.shape == image.shape
        area = (moved > 0).sum() / (mask > 0).sum()
        assert 0.8 * low**2 < area < 1.2 * high**2
        part = _part_region(placed.shape[:2], variant, seed)
        # All of the part stays inside the frame: its texture spans at least the shrunk part's area.
        assert part.sum() > 0.8 * low**2 * 70 * 100
        background = placed[~part].astype(float)
        if variant == "small":  # on the border's colour alone
            np.testing.assert_array_equal(background, 128)
        else:  # on the border's colour with grain and uneven light
            change = np.abs(background - 128)
            assert change.mean() > stress_variants.SCENE_GRAIN / 2 and background.std() > 3
            assert change.max() <= stress_variants.SCENE_LIGHT + 6 * stress_variants.SCENE_GRAIN


def test_posed_places_the_part_near_the_frames_centre() -> None:
    image, _ = _part_with_defect()
    centre = (np.array(image.shape[:2]) - 1) / 2
    reach = stress_variants.MAX_SHIFT * np.array(image.shape[:2]) + 1.0  # a pixel for the warp's rounding
    offsets = []
    for seed in range(8):
        part = _part_region(image.shape[:2], "posed", seed)
        offsets.append(np.argwhere(part).mean(axis=0) - centre)
    assert np.all(np.abs(offsets) <= reach)
    assert np.ptp(offsets, axis=0).min() > 2  # but not in one place: the shift is random


def test_fixture_turns_the_part_in_place_on_one_background() -> None:
    image, mask = _part_with_defect()
    centre = (np.array(image.shape[:2]) - 1) / 2
    reach = stress_variants.FIXTURE_SHIFT * np.array(image.shape[:2]) + 1.0  # a pixel for the rounding
    placed = []
    for seed in range(6):
        moved_image, moved_mask = stress_variants.fixture(image, mask, np.random.default_rng(seed))
        area = (moved_mask > 0).sum() / (mask > 0).sum()
        assert abs(area - stress_variants.FIXTURE_SCALE**2) < 0.2 * stress_variants.FIXTURE_SCALE**2
        part = _part_region(image.shape[:2], "fixture", seed)
        assert np.all(np.abs(np.argwhere(part).mean(axis=0) - centre) <= reach)
        placed.append((moved_image, part))
    # Where neither part lies, two images show the same background: its grain and light do not move...
    (first, first_part), (second, second_part) = placed[0], placed[1]
    free = ~ndimage.binary_dilation(first_part | second_part, iterations=2)
    np.testing.assert_array_equal(first[free], second[free])
    assert first[free].astype(float).std() > stress_variants.SCENE_GRAIN / 2  # ...and it is not plain
    # ...while the part turns: its defect moves between poses.
    assert len({tuple(np.argwhere(_red(moved)).mean(axis=0).round()) for moved, _ in placed}) > 1


def test_two_parts_places_a_second_good_part_apart_from_the_first_and_masks_it() -> None:
    image, _ = _part_with_defect()
    image = np.pad(image, ((75, 75), (60, 60), (0, 0)), constant_values=128)  # a 240 x 240 frame
    first = np.where(_red(image)[..., None], 0, image).astype(np.uint8)  # red only in the second
    second = image[::-1].copy()
    for seed in range(4):
        pixels, mask = stress_variants.two_parts(first, second, np.random.default_rng(seed))
        assert pixels.shape == first.shape and mask.shape == first.shape[:2]
        inside = mask > 0
        low, high = stress_variants.TINY_SCALES
        assert low**2 * 0.8 < inside.mean() < high**2 * 1.2  # one shrunk frame's footprint
        red = _red(pixels)
        assert red.any() and inside[red].all()  # the second part's defect lies in the mask
        texture = np.abs(pixels.astype(float) - 128).max(axis=-1) > 40
        assert texture[~inside].sum() > 0.5 * texture[inside].sum()  # and the first part outside it
        again = stress_variants.two_parts(first, second, np.random.default_rng(seed))
        np.testing.assert_array_equal(again[0], pixels)


def test_no_part_is_the_background_alone_with_an_empty_mask() -> None:
    image, _ = _part_with_defect()
    pixels, mask = stress_variants.no_part(image, np.random.default_rng(0))
    assert pixels.shape == image.shape and pixels.dtype == np.uint8 and not mask.any()
    change = np.abs(pixels.astype(float) - 128)  # the border's grey, with grain and light...
    assert change.mean() > stress_variants.SCENE_GRAIN / 2
    assert change.max() <= stress_variants.SCENE_LIGHT + 6 * stress_variants.SCENE_GRAIN  # ...and no part
    again, _ = stress_variants.no_part(image, np.random.default_rng(0))
    np.testing.assert_array_equal(again, pixels)


def _part_region(shape: tuple[int, int], variant: str, seed: int) -> np.ndarray:
    """Where the variant puts the part (a plain white image run through the same transform)."""
    white = np.full((*shape, 3), 255, np.uint8)
    white[0], white[-1], white[:, 0], white[:, -1] = 0, 0, 0, 0  # a black border: the fill is black
    placed, _ = getattr(stress_variants, variant)(white, None, np.random.default_rng(seed))
    return placed.min(axis=-1) > 192


def test_a_written_variant_is_a_data_set_in_mvtec_layout(category: Path, tmp_path: Path) -> None:
    source = list_test_images(category)
    for variant in stress_variants.VARIANTS:
        written = stress_variants.write_variant(category, variant, tmp_path, seed=0)
        assert written == tmp_path / f"{category.name}-{variant}"
        count = len(training_images(category))
        expected = {
            "few": min(stress_variants.FEW_IMAGES, count),
            "dirty": count + round(stress_variants.DIRTY_SHARE * count),
        }.get(variant, count)
        assert len(training_images(written)) == expected
        tests = list_test_images(written)
        added = {stress_variants.EXTRA, stress_variants.MISSING} if variant == "count" else set()
        assert {item.defect for item in tests} == {item.defect for item in source} | added
        goods = sum(item.defect == "good" for item in source)
        for defect in added:  # per good test image, one with two good parts and one with none
            assert sum(item.defect == defect for item in tests) == goods
        for item in tests:
            if item.defect == stress_variants.MISSING:  # nothing to point at
                assert not np.asarray(Image.open(item.mask_path)).any()
        for item in tests:
            if item.mask_path is not None:
                assert Image.open(item.mask_path).size == Image.open(item.path).size


def test_few_keeps_a_seeded_draw_of_the_training_images_as_they_are(
    category: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stress_variants, "FEW_IMAGES", 3)
    source = {path.name: path for path in training_images(category)}
    drawn = []
    for seed, out in ((5, tmp_path / "a"), (5, tmp_path / "b"), (6, tmp_path / "c")):
        written = training_images(stress_variants.write_variant(category, "few", out, seed))
        assert len(written) == 3
        for path in written:  # the same pixels, saved again
            original = np.asarray(Image.open(source[path.name]).convert("RGB"))
            np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), original)
        drawn.append([path.name for path in written])
    assert drawn[0] == drawn[1] and drawn[0] != drawn[2]
    tests = list_test_images(tmp_path / "a" / f"{category.name}-few")
    assert len(tests) == len(list_test_images(category))


def test_dirty_moves_a_seeded_draw_of_defective_test_images_into_the_training_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    category = make_category(tmp_path / "data" / "widget", n_train=40, n_good=4, n_bad=6)
    monkeypatch.setattr(stress_variants, "DIRTY_SHARE", 0.1)
    source = list_test_images(category)
    slipped_names = []
    for seed, out in ((5, tmp_path / "a"), (5, tmp_path / "b"), (6, tmp_path / "c")):
        written = stress_variants.write_variant(category, "dirty", out, seed)
        train, tests = training_images(written), list_test_images(written)
        slipped = [path for path in train if path.name.startswith("scratch_")]
        assert len(train) == 44 and len(slipped) == 4  # every good one, and 10% as many defective ones
        assert len(tests) == len(source) - 4 and sum(item.label for item in tests) == 2
        left = {item.path.stem for item in tests if item.label}
        for path in slipped:  # the defective image as it was, gone from the test set
            stem = path.stem.removeprefix("scratch_")
            original = np.asarray(Image.open(category / "test" / "scratch" / f"{stem}.png").convert("RGB"))
            np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), original)
            assert stem not in left
        slipped_names.append([path.name for path in slipped])
    assert slipped_names[0] == slipped_names[1] and slipped_names[0] != slipped_names[2]
