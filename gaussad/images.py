"""Reading images of any common kind into 8-bit RGB, and finding image files in folders.

Images come as paths, encoded bytes (a service's request bodies), PIL images, arrays or tensors. Whatever
the input, an image declaring more than `max_pixels` (default `DEFAULT_MAX_PIXELS`) is refused from its
header, before any decoder allocates its pixels: `ImageTooLargeError`; one that cannot be decoded is an
`UnreadableImageError`; each names the image in one line.

Importable without torch (the decisions, the report and the CLI's naming use it): a tensor is recognised
when torch is loaded, which it always is where a tensor exists.
"""

from __future__ import annotations

import io
import os
import struct
import sys
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import imagecodecs
import numpy as np
from PIL import (
    BmpImagePlugin,  # noqa: F401 (imported to register the formats Pillow may read)
    ExifTags,
    GifImagePlugin,  # noqa: F401
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,  # noqa: F401
    PngImagePlugin,  # noqa: F401
    TiffImagePlugin,  # noqa: F401
    WebPImagePlugin,  # noqa: F401
)

from gaussad.errors import GaussADError, ImageTooLargeError, UnreadableImageError

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
# The most pixels an image may declare before it is decoded: 100 megapixels take 300 MB as 8-bit RGB. A
# decompression bomb (a small file declaring a huge image) is refused from its header.
DEFAULT_MAX_PIXELS = 100_000_000
# The formats Pillow may read (MPO comes through JPEG): what cameras and image tools write. Pillow's other
# decoders (EPS through Ghostscript, FLI, SGI, ...) are rarely needed and historically where its
# vulnerabilities were, so an image from the network never reaches them.
PILLOW_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# predict's output folder holds this file: found under an input folder, that folder is not an input.
PREDICTIONS_FILE = "predictions.csv"
# What Pillow's decoders raise on files they cannot take (their own checks, or malformed data reaching
# struct, indexing or arithmetic).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, struct.error)

ImageBytes = (bytes, bytearray, memoryview)
ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray, "torch.Tensor"]


def _is_tensor(item: Any) -> bool:
    """A torch tensor, without importing torch: if torch is not loaded, nothing is a tensor."""
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(item, torch_module.Tensor)


def find_images(path: str | os.PathLike, exclude: Collection[str | os.PathLike] = ()) -> list[Path]:
    """The image files at `path`: the file itself, or every image under a folder (recursive, sorted).

    Below the folder, a folder written by `gaussad predict` (it holds predictions.csv) and the folders in
    `exclude` (a run's own output) are left out, so that a run never reads its own pictures.
    """
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise GaussADError(f"{root}: no such file or folder")
    excluded = {Path(folder).resolve() for folder in exclude}
    found = []
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        if here != root and (PREDICTIONS_FILE in files or here.resolve() in excluded):
            subfolders.clear()
            continue
        found += [here / name for name in files if Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    if not found:
        raise GaussADError(f"{root}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return sorted(found)


def collect_images(
    inputs: ImageInput | Iterable[ImageInput], exclude: Collection[str | os.PathLike] = ()
) -> list[ImageInput]:
    """Flatten user input into a list of single images: folders expand to their image files (`find_images`,
    leaving out `exclude`); encoded image bytes are one image."""
    if isinstance(inputs, (str, os.PathLike, *ImageBytes, Image.Image, np.ndarray)):
        items: Iterable[ImageInput] = [inputs]
    elif _is_tensor(inputs):
        items = list(inputs) if inputs.ndim == 4 else [inputs]
    else:
        items = inputs
    flat: list[ImageInput] = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            flat.extend(find_images(item, exclude))
        else:
            flat.append(item)
    if not flat:
        raise GaussADError("no images given")
    return flat


# --- the pixel limit ---


def check_max_pixels(max_pixels: Any) -> int:
    """`max_pixels` if it is a whole number of at least 1; else a GaussADError."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise GaussADError(f"max_pixels {max_pixels!r}: expected a whole number of pixels, at least 1")
    return int(max_pixels)


def check_size(size: tuple[int, int], max_pixels: int, name: str) -> None:
    """Refuse an image whose (width, height) exceeds `max_pixels`, before anything is decoded, or that
    declares no pixels at all."""
    width, height = size
    if width < 1 or height < 1:
        raise UnreadableImageError(f"{name}: declares {width} x {height} pixels, an empty image")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name}: declares {width} x {height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} pixels"
        )


def _name(source: str | os.PathLike | bytes | bytearray | memoryview) -> str:
    """How messages name an encoded image: its path, or its length in bytes."""
    if isinstance(source, ImageBytes):
        return f"image data ({memoryview(source).nbytes:,} bytes)"
    return str(source)


def _read_source(source: str | os.PathLike | bytes | bytearray | memoryview) -> bytes:
    """The encoded bytes of a file or a buffer; a missing or unreadable file is an UnreadableImageError."""
    if isinstance(source, ImageBytes):
        return source if isinstance(source, bytes) else bytes(source)
    try:
        return Path(source).read_bytes()
    except FileNotFoundError:
        raise UnreadableImageError(f"{source}: no such file") from None
    except OSError as error:
        raise UnreadableImageError(f"{source}: cannot read ({error.strerror or error})") from None


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first bytes of a PNG or WebP file, the formats whose decoders must see no
    file over the limit: libpng decodes at once, and libwebp allocates the canvas as Pillow opens a file.
    None for other formats: Pillow reads their headers without allocating their pixels."""
    if data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP" or len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended format: the canvas, 24 bits each, minus one
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L":  # lossless: 14 bits each, minus one
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":  # lossy: the key frame's 14-bit sizes
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@contextmanager
def _decoding(name: str) -> Iterator[None]:
    """Errors of Pillow's decoders as UnreadableImageError naming the image, in one line."""
    try:
        yield
    except GaussADError:
        raise
    except Image.DecompressionBombError as error:  # Pillow's own limit, met inside a decoder (GIF frames)
        raise ImageTooLargeError(f"{name}: {_one_line(error)}") from None
    except DECODE_ERRORS as error:
        raise UnreadableImageError(f"{name}: cannot read image ({_one_line(error)})") from None


def _open_with_pillow(data: bytes, name: str) -> ImageFile.ImageFile:
    """Pillow's image for `data`, its header read and nothing decoded, in one of PILLOW_FORMATS.

    As `Image.open` does, but without its own pixel limit: that is process-wide (`Image.MAX_IMAGE_PIXELS`)
    and smaller than some cameras' images, and the caller checks `max_pixels` instead.
    """
    prefix = data[:16]
    for format_id in PILLOW_FORMATS:
        factory, accept = Image.OPEN[format_id]
        if accept is not None and accept(prefix) is not True:  # a text is Pillow's "not supported here"
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open takes as "not this one"
            continue
    raise UnreadableImageError(f"{name}: cannot read image (not a PNG, JPEG, BMP, TIFF, WebP or GIF image)")


def image_size_from_header(source: str | os.PathLike | bytes | bytearray | memoryview) -> tuple[int, int]:
    """The (width, height) an encoded image declares, read from its header without decoding it: a service
    can refuse an image too large before it costs memory. Unreadable headers are UnreadableImageError."""
    data, name = _read_source(source), _name(source)
    size = _declared_size(data)
    if size is None:
        with _decoding(name), _open_with_pillow(data, name) as opened:
            size = opened.size
    return size


def open_image(
    source: str | os.PathLike | bytes | bytearray | memoryview, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """The image in its own mode (for files read as they are, such as masks), decoded once its declared
    size is within `max_pixels`; errors name the image."""
    data, name = _read_source(source), _name(source)
    with _decoding(name):
        opened = _open_with_pillow(data, name)
        check_size(opened.size, max_pixels, name)
        opened.load()
    return opened


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB with the camera's orientation applied.

    16-bit and float grayscale are rescaled to 8 bits (not clipped); transparent pixels are composited over
    black, so what was invisible does not leak into the features.
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # else exif_transpose would only copy
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        depth = 65535.0 if image.mode.startswith("I;16") or np.asarray(image).max() > 255 else 255.0
        values = np.asarray(image, dtype=np.float64) / depth
        image = Image.fromarray(np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        image = Image.fromarray(np.clip(np.rint(values / scale * 255.0), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def _decode(data: bytes, name: str, max_pixels: int) -> np.ndarray | Image.Image:
    """Encoded bytes as decoded pixels, within the limit: a PNG through libpng (imagecodecs) as the array
    it decodes to, 2-3x faster than Pillow on large PNGs, where decoding costs as much as the backbone;
    anything else, a PNG with EXIF orientation to apply, or one libpng refuses, through Pillow as RGB."""
    size = _declared_size(data)
    if size is not None:
        check_size(size, max_pixels, name)
    if size is not None and data[:8] == PNG_SIGNATURE and b"eXIf" not in data:
        try:
            pixels = imagecodecs.png_decode(data)
        except (ValueError, RuntimeError, imagecodecs.PngError):  # Pillow then names the problem
            pixels = None
        if pixels is not None:
            return pixels[..., [0, 0, 0, 1]] if pixels.ndim == 3 and pixels.shape[-1] == 2 else pixels
    with _decoding(name):
        opened = _open_with_pillow(data, name)
        check_size(opened.size, max_pixels, name)
        opened.load()
        return to_rgb(opened)


def _is_rgb8(pixels: np.ndarray) -> bool:
    return pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[-1] == 3


def read_image(
    source: str | os.PathLike | bytes | bytearray | memoryview, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode an image file or encoded bytes to RGB. A missing or unreadable image is an
    UnreadableImageError naming it; one declaring more than `max_pixels` an ImageTooLargeError."""
    decoded = _decode(_read_source(source), _name(source), max_pixels)
    return array_to_rgb(decoded) if isinstance(decoded, np.ndarray) else decoded


def array_to_rgb(array: np.ndarray) -> Image.Image:
    """An (H, W), (H, W, 1|3|4) array as RGB: uint8 as is, uint16 over 65535, floats as values in [0, 1]."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise GaussADError(f"image array of shape {array.shape}: expected (H, W), (H, W, 3) or (H, W, 4)")
    if array.dtype == np.uint8:
        data = array
    elif array.dtype == np.uint16:
        data = np.rint(array.astype(np.float64) / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        data = np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise GaussADError(f"image array of dtype {array.dtype}: expected uint8, uint16 or float in [0, 1]")
    mode = "L" if data.ndim == 2 else ("RGB" if data.shape[-1] == 3 else "RGBA")
    data = np.ascontiguousarray(data)
    # Shares the array's memory: no zero-filled image to decode into, no copy (2-3 ms per 900 x 900 image).
    return to_rgb(Image.frombuffer(mode, (data.shape[1], data.shape[0]), data, "raw", mode, 0, 1))


def tensor_to_rgb(tensor: torch.Tensor) -> Image.Image:
    """A (C, H, W) tensor, torchvision style (uint8, or float in [0, 1]), as RGB."""
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        raise GaussADError(
            f"image tensor of shape {tuple(tensor.shape)}: expected (C, H, W) with C in 1, 3, 4"
        )
    return array_to_rgb(tensor.detach().cpu().permute(1, 2, 0).numpy())


def _check_in_memory(item: Image.Image | np.ndarray | torch.Tensor, max_pixels: int) -> None:
    """`check_size` for an image already in memory (a PIL image may not be decoded yet); a shape that is
    no image's is left to the conversion to name."""
    if isinstance(item, Image.Image):
        check_size(item.size, max_pixels, "PIL image")
    elif _is_tensor(item) and item.ndim >= 2:
        check_size((item.shape[-1], item.shape[-2]), max_pixels, "image tensor")
    elif isinstance(item, np.ndarray) and item.ndim >= 2:
        check_size((item.shape[1], item.shape[0]), max_pixels, "image array")


def load_rgb(item: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Any supported single-image input as an RGB PIL image, within `max_pixels`."""
    if isinstance(item, (str, os.PathLike, *ImageBytes)):
        return read_image(item, max_pixels)
    if not isinstance(item, (Image.Image, np.ndarray)) and not _is_tensor(item):
        raise GaussADError(f"unsupported image input of type {type(item).__name__}")
    _check_in_memory(item, max_pixels)
    if isinstance(item, Image.Image):
        with _decoding("PIL image"):
            return to_rgb(item)
    return array_to_rgb(item) if isinstance(item, np.ndarray) else tensor_to_rgb(item)


def load_pixels(item: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any supported single-image input as RGB pixels (H, W, 3) uint8, within `max_pixels`. An 8-bit RGB
    PNG or array comes as decoded or given, without passing through a PIL image (a copy of 2.4 MB at
    900 x 900)."""
    if isinstance(item, (str, os.PathLike, *ImageBytes)):
        decoded = _decode(_read_source(item), _name(item), max_pixels)
        if isinstance(decoded, Image.Image):
            return np.asarray(decoded)
        return decoded if _is_rgb8(decoded) else np.asarray(array_to_rgb(decoded))
    if isinstance(item, np.ndarray) and _is_rgb8(item):
        _check_in_memory(item, max_pixels)
        return item
    return np.asarray(load_rgb(item, max_pixels))


def describe(item: ImageInput, index: int) -> str:
    """A name for an input image in results: its path, or its position in the batch."""
    return str(item) if isinstance(item, (str, os.PathLike)) else f"<image {index}>"
