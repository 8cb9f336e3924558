"""A request's encoded image -> 8-bit RGB pixels, as the library reads image bytes (`gaussad.images`):
the same decoders, orientation and colour rules as `gaussad predict`, and the pixel limit checked on the
header before any pixel is decoded."""

from __future__ import annotations

import numpy as np

from gaussad.errors import UnreadableImageError
from gaussad.images import DEFAULT_MAX_PIXELS, load_pixels


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 pixels of an encoded image; `ImageTooLargeError` for a header declaring more than
    `max_pixels` pixels, `UnreadableImageError` naming the problem for anything else not decodable."""
    if not data:
        raise UnreadableImageError("empty body: send the encoded image (PNG, JPEG, BMP, TIFF or WebP)")
    return load_pixels(bytes(data), max_pixels)
