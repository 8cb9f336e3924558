"""Every common kind of image becomes the right 8-bit RGB input; folders are searched recursively."""

import io
import struct
import zlib

import imagecodecs
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from gaussad.errors import GaussADError, ImageTooLargeError, UnreadableImageError
from gaussad.images import (
    DEFAULT_MAX_PIXELS,
    PNG_SIGNATURE,
    PREDICTIONS_FILE,
    check_max_pixels,
    collect_images,
    describe,
    find_images,
    image_size_from_header,
    load_pixels,
    load_rgb,
    read_image,
    to_rgb,
)


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


# --- hostile and unusual inputs ---


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zero_png(width: int, height: int) -> bytes:
    """A valid grey PNG of zeros: a few KB that decode to width x height bytes (a decompression bomb)."""
    compressor, parts = zlib.compressobj(9), []
    row = b"\0" * (width + 1)  # filter byte and pixels
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", b"".join(parts))
        + png_chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def declaring(kind: str, width: int, height: int) -> bytes:
    """A small file of `kind` whose header declares width x height pixels."""
    small = Image.new("RGB", (16, 16), (90, 60, 30))
    if kind == "png":
        return zero_png(16, 16)[:16] + struct.pack(">II", width, height) + zero_png(16, 16)[24:]
    if kind == "bmp":
        data = bytearray(encoded(small, "BMP"))
        data[18:26] = struct.pack("<ii", width, height)
        return bytes(data)
    if kind == "gif":
        data = bytearray(encoded(small, "GIF"))
        data[6:10] = struct.pack("<HH", width, height)
        return bytes(data)
    if kind == "jpeg":
        data = bytearray(encoded(small, "JPEG"))
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
        return bytes(data)
    if kind == "webp":
        data = bytearray(encoded(small, "WEBP", lossless=True))
        data[21:25] = ((width - 1) | (height - 1) << 14 | data[24] >> 4 << 28).to_bytes(4, "little")
        return bytes(data)
    # tiff: an uncompressed strip whose width and length tags say otherwise
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8)]
    entries += [(277, 3, 1), (278, 4, height), (279, 4, 16)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind_, 1)
        + struct.pack("<I" if kind_ == 4 else "<HH", *((value,) if kind_ == 4 else (value, 0)))
        for tag, kind_, value in entries
    )
    return b"II*\0" + struct.pack("<I", 24) + b"\0" * 16 + ifd + b"\0\0\0\0"


KINDS = ["png", "bmp", "gif", "jpeg", "webp", "tiff"]
PILLOW_DEFAULT_LIMIT = Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize("kind", KINDS)
def test_declared_sizes_are_read_from_the_header(kind: str, tmp_path) -> None:
    data = declaring(kind, 30, 20)
    assert image_size_from_header(data) == (30, 20)
    (tmp_path / f"x.{kind}").write_bytes(data)
    assert image_size_from_header(tmp_path / f"x.{kind}") == (30, 20)


@pytest.mark.parametrize("kind", KINDS)
def test_images_over_the_limit_are_refused_before_decoding(kind: str, tmp_path, monkeypatch) -> None:
    """A PNG declaring 30000 x 30000 zero pixels was decoded (13.7 GB); other formats met PIL's
    DecompressionBombError, a traceback. Every decoder now sees only images within the limit."""
    decoded = []
    monkeypatch.setattr(imagecodecs, "png_decode", lambda *a, **k: decoded.append("libpng"))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda *a, **k: decoded.append("pillow"))
    side = 16384 if kind == "webp" else 30000  # WebP's largest
    data = declaring(kind, side, side)
    message = f"declares {side} x {side} = {side * side:,} pixels, over the limit of 100,000,000 pixels"
    with pytest.raises(ImageTooLargeError, match=message):
        load_pixels(data)
    (tmp_path / f"bomb.{kind}").write_bytes(data)
    with pytest.raises(ImageTooLargeError, match=f"bomb.{kind}: {message}"):
        read_image(tmp_path / f"bomb.{kind}")
    with pytest.raises(ImageTooLargeError, match="over the limit of 1,000 pixels"):
        load_pixels(declaring(kind, 50, 30), max_pixels=1000)
    assert decoded == []
    assert Image.MAX_IMAGE_PIXELS == PILLOW_DEFAULT_LIMIT  # Pillow's process-wide limit is left alone


def test_a_real_zero_filled_bomb_is_refused_and_the_limit_is_settable() -> None:
    bomb = zero_png(4000, 3000)
    assert len(bomb) < 20_000 and DEFAULT_MAX_PIXELS == 100_000_000
    with pytest.raises(ImageTooLargeError, match="image data .*: declares 4000 x 3000"):
        load_pixels(bomb, max_pixels=10_000_000)
    assert load_pixels(bomb, max_pixels=12_000_000).shape == (3000, 4000, 3)
    with pytest.raises(GaussADError, match="max_pixels 0: expected a whole number"):
        check_max_pixels(0)
    with pytest.raises(ImageTooLargeError, match="image array: declares 4 x 3"):
        load_pixels(np.zeros((3, 4, 3), np.uint8), max_pixels=11)
    lazy = Image.open(io.BytesIO(encoded(Image.new("L", (40, 30)), "PNG")))  # not decoded yet
    with pytest.raises(ImageTooLargeError, match="PIL image: declares 40 x 30"):
        load_pixels(lazy, max_pixels=1000)


def test_encoded_bytes_are_an_image_input_everywhere(tmp_path) -> None:
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    picture.save(tmp_path / "x.png")
    data = (tmp_path / "x.png").read_bytes()
    expected = load_pixels(tmp_path / "x.png")
    for given in (data, bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(load_pixels(given), expected)
        np.testing.assert_array_equal(np.asarray(load_rgb(given)), expected)
    assert collect_images(data) == [data]  # one image, not its bytes
    assert collect_images([data, tmp_path / "x.png"]) == [data, tmp_path / "x.png"]
    assert describe(data, 3) == "<image 3>"
    jpeg = encoded(picture, "JPEG", quality=95)
    assert load_pixels(jpeg).shape == (5, 7, 3)
    with pytest.raises(UnreadableImageError, match=r"image data \(5 bytes\): cannot read image"):
        load_pixels(b"hello")


def test_only_common_formats_reach_a_decoder(tmp_path) -> None:
    """Pillow's rarer decoders (EPS through Ghostscript, SGI, ...) are never given an image."""
    for kind in ("PPM", "ICO", "TGA", "SGI"):
        with pytest.raises(UnreadableImageError, match="not a PNG, JPEG, BMP, TIFF, WebP or GIF image"):
            load_pixels(encoded(Image.new("RGB", (4, 4)), kind))


def test_odd_modes_and_multi_frame_files_become_rgb() -> None:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
    palette = rgb.quantize(8)
    palette.info["transparency"] = 0
    frames = [Image.new("RGB", (5, 6), color) for color in ((255, 0, 0), (0, 255, 0))]
    inputs = {
        "cmyk jpeg": encoded(rgb.convert("CMYK"), "JPEG"),
        "cmyk tiff": encoded(rgb.convert("CMYK"), "TIFF"),
        "1-bit png": encoded(rgb.convert("1"), "PNG"),
        "palette with transparency": encoded(palette, "PNG", transparency=0),
        "I;16 tiff": encoded(Image.fromarray(rng.integers(0, 65536, (6, 5), dtype=np.uint16)), "TIFF"),
        "LA png": encoded(rgb.convert("LA"), "PNG"),
        "animated gif": encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "multi-page tiff": encoded(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
    }
    for name, data in inputs.items():
        pixels = load_pixels(data)
        assert pixels.shape == (6, 5, 3) and pixels.dtype == np.uint8, name
    assert (load_pixels(inputs["animated gif"]) == (255, 0, 0)).all()  # the first frame
    assert (load_pixels(inputs["multi-page tiff"]) == (255, 0, 0)).all()
    one_bit = load_pixels(inputs["1-bit png"])
    assert set(np.unique(one_bit)) <= {0, 255}


def test_folders_written_by_predict_and_excluded_folders_are_not_searched(tmp_path) -> None:
    for name in ("a.png", "out/maps/a.png", "old/maps/b.png", "skip/c.png", "keep/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (2, 2)).save(tmp_path / name)
    (tmp_path / "out" / PREDICTIONS_FILE).write_text("path\n")
    (tmp_path / "old" / PREDICTIONS_FILE).write_text("path\n")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path, exclude=[tmp_path / "skip"])]
    assert found == ["a.png", "keep/d.png"]
    assert [p.name for p in find_images(tmp_path / "out")] == ["a.png"]  # given itself: searched
