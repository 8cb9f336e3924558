"""Every common kind of image becomes the right 8-bit RGB input; folders are searched recursively."""

import numpy as np
import pytest
import torch
from PIL import Image

from gaussad.errors import GaussADError
from gaussad.images import collect_images, find_images, load_pixels, load_rgb, read_image, to_rgb


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def test_grayscale_becomes_three_equal_channels(tmp_path) -> None:
    Image.fromarray(np.array([[0, 128], [200, 255]], dtype=np.uint8), mode="L").save(tmp_path / "g.png")
    rgb = pixels(read_image(tmp_path / "g.png"))
    np.testing.assert_array_equal(rgb[..., 0], [[0, 128], [200, 255]])
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_sixteen_bit_grayscale_is_rescaled_not_clipped(tmp_path) -> None:
    values = np.array([[0, 32768], [65535, 257]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as opened:
        assert opened.mode.startswith("I")
    np.testing.assert_array_equal(pixels(read_image(tmp_path / "deep.png"))[..., 1], [[0, 128], [255, 1]])


def test_rgba_composites_over_black(tmp_path) -> None:
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)  # opaque
    rgba[0, 1] = (200, 100, 50, 0)  # fully transparent: its colour must not leak
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(pixels(read_image(tmp_path / "a.png")), [[[200, 100, 50], [0, 0, 0]]])


def test_palette_image(tmp_path) -> None:
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette_image.putpixel((1, 0), 1)
    palette_image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(pixels(read_image(tmp_path / "p.png")), [[[0, 0, 0], [10, 20, 30]]])


def test_exif_orientation_is_applied(tmp_path) -> None:
    wide = np.zeros((2, 4, 3), dtype=np.uint8)
    wide[0, 0] = 255  # a marker in the top-left corner
    image = Image.fromarray(wide)
    exif = image.getexif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    shown = pixels(read_image(tmp_path / "rotated.jpg"))
    assert shown.shape == (4, 2, 3)
    assert shown[0, 1].mean() > 200 and shown[0, 0].mean() < 60


def test_arrays_and_tensors() -> None:
    gray = np.full((3, 4), 0.5, dtype=np.float32)
    assert pixels(load_rgb(gray)).shape == (3, 4, 3) and pixels(load_rgb(gray))[0, 0, 0] == 128
    chw = torch.zeros(3, 5, 6, dtype=torch.uint8)
    chw[1] = 77
    np.testing.assert_array_equal(pixels(load_rgb(chw))[0, 0], [0, 77, 0])
    np.testing.assert_array_equal(pixels(load_rgb(np.full((2, 2), 65535, np.uint16)))[0, 0], [255, 255, 255])
    with pytest.raises(GaussADError, match="shape"):
        load_rgb(np.zeros((2, 2, 5)))


def test_find_images_recursive_sorted_and_errors(tmp_path) -> None:
    for name in ("b/2.png", "a/1.jpg", "a/deeper/3.PNG"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (2, 2)).save(tmp_path / name, format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a/1.jpg", "a/deeper/3.PNG", "b/2.png"]
    with pytest.raises(GaussADError, match="no such file or folder"):
        find_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GaussADError, match="no images found"):
        find_images(tmp_path / "empty")
    assert len(collect_images([tmp_path / "a", np.zeros((2, 2))])) == 3


def test_unreadable_image_names_the_file(tmp_path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(GaussADError, match="broken.png: cannot read image"):
        read_image(tmp_path / "broken.png")
    with pytest.raises(GaussADError, match="broken.png: cannot read image"):
        load_pixels(tmp_path / "broken.png")


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)),
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (5, 7), dtype=np.uint8)),
        Image.fromarray(np.random.default_rng(2).integers(0, 65536, (5, 7), dtype=np.uint16)),
        Image.fromarray(np.random.default_rng(3).integers(0, 256, (5, 7, 4), dtype=np.uint8), mode="RGBA"),
        Image.fromarray(np.random.default_rng(4).integers(0, 256, (5, 7, 3), dtype=np.uint8)).convert("LA"),
        Image.fromarray(np.random.default_rng(5).integers(0, 256, (5, 7, 3), dtype=np.uint8)).quantize(16),
    ],
    ids=["rgb", "gray", "gray16", "rgba", "gray-alpha", "palette"],
)
def test_fast_png_decoding_equals_pillow(image: Image.Image, tmp_path) -> None:
    image.save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as opened:
        opened.load()
        expected = pixels(to_rgb(opened))
    np.testing.assert_array_equal(pixels(read_image(tmp_path / "x.png")), expected)
    np.testing.assert_array_equal(load_pixels(tmp_path / "x.png"), expected)  # the model's input path


def test_png_with_exif_orientation_is_rotated(tmp_path) -> None:
    wide = np.zeros((2, 4, 3), dtype=np.uint8)
    image = Image.fromarray(wide)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.png", exif=exif)
    assert pixels(read_image(tmp_path / "rotated.png")).shape == (4, 2, 3)
    assert load_pixels(tmp_path / "rotated.png").shape == (4, 2, 3)
