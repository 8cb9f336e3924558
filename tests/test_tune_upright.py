"""`benchmarks/tune_upright.py`: its two ways of finding how an image is turned, and the copies it writes."""

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import benchmark_script, make_category
from PIL import Image

tune_upright = benchmark_script("tune_upright")


def _stripes(degrees: float, size: int = 129) -> np.ndarray:
    """Grey stripes whose lines stand `degrees` from vertical (towards the columns), as RGB."""
    rows, columns = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = math.radians(degrees)
    across = -rows * math.sin(angle) + columns * math.cos(angle)
    return np.repeat((127 + 100 * np.sin(across / 3)).astype(np.uint8)[..., None], 3, axis=-1)


def _bar(degrees: float) -> tuple[np.ndarray, tuple[float, float]]:
    """A bright bar 120 x 30 px, its long axis `degrees` from vertical, on a dark plain background."""
    rows, columns = np.mgrid[0:200, 0:200].astype(np.float64)
    centre = (100.0, 90.0)
    angle = math.radians(degrees)
    along = (rows - centre[0]) * math.cos(angle) + (columns - centre[1]) * math.sin(angle)
    across = -(rows - centre[0]) * math.sin(angle) + (columns - centre[1]) * math.cos(angle)
    pixels = np.full((200, 200, 3), 30, np.uint8)
    pixels[(np.abs(along) < 60) & (np.abs(across) < 15)] = 200
    return pixels, centre


def _half_turn_apart(found: float, expected: float) -> float:
    """The angle between two turns, in degrees, a half turn counting as none (a line has no head)."""
    return abs((math.degrees(found - expected) + 90) % 180 - 90)


@pytest.mark.parametrize("degrees", [0.0, 20.0, -35.0, 60.0])
def test_texture_lines_are_turned_to_stand_vertical(degrees: float) -> None:
    pixels = _stripes(degrees)
    turn = tune_upright.texture_turn(pixels)
    assert _half_turn_apart(turn[0], math.radians(degrees)) < 1.0
    upright = tune_upright.turned(pixels, turn, 1, "nearest")[25:-25, 25:-25, 0].astype(np.float64)
    # Vertical lines: next to no change down a column, the stripes' change across the rows.
    assert np.abs(np.diff(upright, axis=0)).mean() < 0.05 * np.abs(np.diff(upright, axis=1)).mean()


@pytest.mark.parametrize("degrees", [0.0, 30.0, -50.0])
def test_a_part_is_turned_about_its_centroid_to_stand_along_its_long_axis(degrees: float) -> None:
    pixels, centre = _bar(degrees)
    turn = tune_upright.part_turn(pixels)
    assert turn is not None
    assert _half_turn_apart(turn[0], math.radians(degrees)) < 2.0
    assert np.allclose(turn[1], centre, atol=2.0)
    rows, columns = np.nonzero(tune_upright.turned(pixels, turn, 1, "nearest")[..., 0] > 115)
    assert np.ptp(rows) == pytest.approx(120, abs=4) and np.ptp(columns) == pytest.approx(30, abs=4)
    assert tune_upright.part_turn(np.full((200, 200, 3), 30, np.uint8)) is None


def test_a_mask_turns_with_its_image_and_stays_binary() -> None:
    pixels, _ = _bar(30.0)
    mask = np.where(pixels[..., 0] > 100, 255, 0).astype(np.uint8)
    turn = tune_upright.part_turn(pixels)
    moved = tune_upright.turned(mask, turn, 0, "constant")
    assert set(np.unique(moved)) <= {0, 255}
    image = tune_upright.turned(pixels, turn, 1, "nearest")[..., 0] > 115
    assert np.mean((moved > 0) == image) > 0.99


def test_the_upright_copy_keeps_the_layout_and_is_made_once(tmp_path: Path) -> None:
    category = make_category(tmp_path / "widget", n_train=3, n_good=2, n_bad=2)
    copy = tune_upright.write_upright(category, "texture", root=tmp_path / "upright")
    assert copy == tmp_path / "upright" / "widget-texture"
    for part in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        names = sorted(path.name for path in (category / part).iterdir())
        assert sorted(path.name for path in (copy / part).iterdir()) == names
    original = np.asarray(Image.open(category / "test/scratch/000.png").convert("RGB"))
    turn = tune_upright.texture_turn(original)
    written = np.asarray(Image.open(copy / "test/scratch/000.png"))
    assert np.array_equal(written, tune_upright.turned(original, turn, 1, "nearest"))
    (copy / "train/good/000.png").unlink()
    assert tune_upright.write_upright(category, "texture", root=tmp_path / "upright") == copy
    assert not (copy / "train/good/000.png").exists()  # made once: a second call leaves it be
