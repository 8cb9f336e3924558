"""The part and the window around it: where a part lies on a background, the model input can spend its
pixels on the part.

`part_region` finds the part in one image (synthetic defects are placed on it, `gaussad.synthetic`).
`learn_crop` sizes a window from the training images' parts: the largest extent of any of them on each
axis, with a margin, so every good part fits and every image is cut at the same scale; it stays at the
parts' place where they sit still, and follows each image's part where they move; `parts_move` tells from
the same boxes whether parts move about, for the rules of a fit's options. `frame` cuts an image
to its window before it is resized to the model input, and `framed` puts a map made for the window back
in the whole image. Where the training images show no part on a background
(a texture, a part filling the frame, a part found on too few of them), or the window would be nearly the
whole frame, there is no window: the whole image is the input, as without one. Pure numpy and scipy, so
the exported model's runtime frames images as the library does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import numpy as np
from scipy import ndimage

# The part on a background: the largest region of pixels whose colour and contrast, averaged over
# PART_SMOOTHING of the side, lie more than PART_DISTANCE robust deviations from those of the image's border
# (a band of BORDER_BAND of the side); one under PART_MIN_SHARE of the image is no part. Synthetic defects
# need that much room on the part; the window needs only to know where a part is, and matters most for
# the smallest ones, so it takes parts down to WINDOW_PART_MIN_SHARE, where they hold at least
# WINDOW_PART_DOMINANCE of all the pixels unlike the border: a part on a background is the one thing
# there, while a mark on a texture is one of several (a texture's marks are no part to cut around).
PART_SMOOTHING = 0.02
BORDER_BAND = 0.03
PART_DISTANCE = 4.0
PART_MIN_SHARE = 0.1
WINDOW_PART_MIN_SHARE = 0.02
WINDOW_PART_DOMINANCE = 0.6
DEVIATION_FLOOR = 2.0  # grey levels added to the border's deviation: a plain border makes any shade part
CONTRAST_WEIGHT = 20.0  # grey levels per unit of log contrast: a doubled contrast counts as 14 grey levels


def part_region(
    image: np.ndarray, min_share: float = PART_MIN_SHARE, min_dominance: float = 0.0
) -> np.ndarray | None:
    """Where an (H, W, 3) uint8 image's part lies on a background, as an (H, W) bool mask: the largest
    connected region of pixels whose local colour and contrast are unlike the image's border (robust
    distance from the border's median over its median absolute deviation), opened and with holes filled.
    None where it is under `min_share` of the image, or holds less than `min_dominance` of the unlike
    pixels: a texture or a part filling the frame, whose border is the part itself and whose unlike places
    are its own features."""
    pixels = image.astype(np.float32)
    height, width = pixels.shape[:2]
    sigma = max(1.0, PART_SMOOTHING * min(height, width))
    colour = np.stack([ndimage.gaussian_filter(pixels[..., channel], sigma) for channel in range(3)], axis=-1)
    grey = pixels.mean(axis=-1)
    variance = ndimage.gaussian_filter(grey**2, sigma) - ndimage.gaussian_filter(grey, sigma) ** 2
    contrast = CONTRAST_WEIGHT * np.log1p(np.sqrt(np.maximum(variance, 0.0)))
    local = np.concatenate([colour, contrast[..., None]], axis=-1)
    band = max(1, int(BORDER_BAND * min(height, width)))
    border = np.concatenate(
        [local[:band].reshape(-1, 4), local[-band:].reshape(-1, 4)]
        + [local[:, :band].reshape(-1, 4), local[:, -band:].reshape(-1, 4)]
    )
    median = np.median(border, axis=0)
    # The median absolute deviation, scaled to a normal standard deviation.
    deviation = 1.4826 * np.median(np.abs(border - median), axis=0) + DEVIATION_FLOOR
    distance = np.sqrt((((local - median) / deviation) ** 2).sum(axis=-1))
    labels, count = ndimage.label(ndimage.binary_opening(distance > PART_DISTANCE, iterations=2))
    if not count:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    if sizes.max() < min_dominance * sizes.sum():
        return None
    largest = 1 + int(np.argmax(sizes))
    region = ndimage.binary_fill_holes(labels == largest)
    return region if region.mean() >= min_share else None


# The window: the largest part extent over the training images times CROP_MARGIN, per axis, as a share of
# the image's height and width. No window where the parts were found on fewer than MIN_FOUND_SHARE of the
# training images, or where it would span MAX_WINDOW_SHARE of the frame on both axes (a zoom under 1.1).
# Parts found on MOVING_FOUND_SHARE of them already show whether they move about (`parts_move`): that
# cuts nothing, so it needs less than a window, which cuts blind in every image whose part is not found.
CROP_MARGIN = 1.1
MIN_FOUND_SHARE = 0.9
MOVING_FOUND_SHARE = 0.5
MAX_WINDOW_SHARE = 0.9
FIND_SIDE = 112  # the part is found on every k-th pixel, k such that the short side keeps about this many

Box = tuple[float, float, float, float]  # top, bottom, left, right of a part, as shares of the sides
MapT = TypeVar("MapT")  # a map as the caller holds it (a tensor in PyTorch, an array in the runtime)


class Crop(NamedTuple):
    """A window's height and width as shares of the image's, and where it sits: at `centre` (row and
    column, as shares of the height and width) in every image, or, without one, on each image's own part."""

    height: float
    width: float
    centre: tuple[float, float] | None = None

    def as_json(self) -> dict[str, Any]:
        centre = None if self.centre is None else list(self.centre)
        return {"height": self.height, "width": self.width, "centre": centre}

    @classmethod
    def from_json(cls, values: Any) -> Crop | None:
        """A saved window (`as_json`), or None for none; ValueError where it is malformed."""
        if values is None:
            return None
        if not isinstance(values, dict) or set(values) != {"height", "width", "centre"}:
            raise ValueError(f"crop {values!r} is not an object of height, width and centre")
        shares = [values["height"], values["width"]]
        centre = values["centre"]
        if centre is not None:
            if not isinstance(centre, list) or len(centre) != 2:
                raise ValueError(f"crop centre {centre!r} is not a row and a column")
            shares += centre
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in shares):
            raise ValueError(f"crop {values!r} has shares outside [0, 1]")
        if not (shares[0] > 0 and shares[1] > 0):
            raise ValueError(f"crop {values!r} is empty")
        fixed = None if centre is None else (float(shares[2]), float(shares[3]))
        return cls(float(shares[0]), float(shares[1]), fixed)


@dataclass(frozen=True)
class Window:
    """A rectangle of an image, in its pixels."""

    top: int
    left: int
    height: int
    width: int

    @classmethod
    def whole(cls, size: tuple[int, int]) -> Window:
        return cls(0, 0, int(size[0]), int(size[1]))

    def scaled(self, size: tuple[int, int], target: tuple[int, int]) -> Window:
        """The same rectangle in the image resized from `size` to `target` (height, width)."""
        rows = _scaled_span(self.top, self.height, size[0], target[0])
        columns = _scaled_span(self.left, self.width, size[1], target[1])
        return Window(rows[0], columns[0], rows[1], columns[1])


def _scaled_span(start: int, length: int, total: int, target: int) -> tuple[int, int]:
    """A span of `total` pixels at `target`: its start and length rounded half up, at least one pixel."""
    ratio = target / total
    first = min(target - 1, math.floor(start * ratio + 0.5))
    return first, max(1, min(target - first, math.floor(length * ratio + 0.5)))


def part_box(pixels: np.ndarray) -> Box | None:
    """The bounding box of an (H, W, 3) uint8 image's part (`part_region`, down to
    `WINDOW_PART_MIN_SHARE` of the image and `WINDOW_PART_DOMINANCE`), found on every k-th pixel, as shares
    of the image's sides; None where it has no part on a background."""
    height, width = pixels.shape[:2]
    step = max(1, min(height, width) // FIND_SIDE)
    region = part_region(pixels[::step, ::step], WINDOW_PART_MIN_SHARE, WINDOW_PART_DOMINANCE)
    if region is None:
        return None
    rows, columns = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    found_height, found_width = region.shape
    return (
        rows[0] / found_height,
        (rows[-1] + 1) / found_height,
        columns[0] / found_width,
        (columns[-1] + 1) / found_width,
    )


def learn_crop(boxes: Sequence[Box | None], min_found: float = MIN_FOUND_SHARE) -> Crop | None:
    """The window for images whose parts' boxes these are (the training images'), or None for none (also
    where parts were found on fewer than `min_found` of them). Where one window at the parts' median centre
    holds every part found, the parts sit still (aligned, or turning in place) and the window stays there
    in every image: centring it on each image's part would only add the finder's jitter to an alignment
    that the grid and the per-position Gaussian rely on."""
    if not boxes or crop_ruled_out(boxes, len(boxes), min_found):
        return None
    height, width = _window_shares(boxes)
    found = np.array([box for box in boxes if box is not None], dtype=np.float64)
    centre = (
        _inside(float(np.median(found[:, :2].mean(axis=1))), height),
        _inside(float(np.median(found[:, 2:].mean(axis=1))), width),
    )
    holds = (
        (found[:, 0] >= centre[0] - height / 2 - 1e-9).all()
        and (found[:, 1] <= centre[0] + height / 2 + 1e-9).all()
        and (found[:, 2] >= centre[1] - width / 2 - 1e-9).all()
        and (found[:, 3] <= centre[1] + width / 2 + 1e-9).all()
    )
    return Crop(float(height), float(width), centre if holds else None)


def _inside(centre: float, share: float) -> float:
    """A window's centre (a share of the side) moved so that a window of `share` lies inside the image."""
    return min(max(centre, share / 2), 1.0 - share / 2)


def parts_move(boxes: Sequence[Box | None]) -> bool:
    """Whether the parts of images whose boxes these are move about the frame: found on at least
    `MOVING_FOUND_SHARE` of them (a texture's marks, found here and there, are not parts), a window around
    them would follow each one. A feature then has no one place in the frame."""
    crop = learn_crop(boxes, MOVING_FOUND_SHARE)
    return crop is not None and crop.centre is None


def crop_ruled_out(boxes: Sequence[Box | None], total: int, min_found: float = MIN_FOUND_SHARE) -> bool:
    """Whether the boxes of some of `total` training images rule a window out whatever the others' are:
    parts not found on more than 1 - `min_found` of all the images, or found spanning nearly the frame on
    both axes (the window only grows with more parts). A fit stops finding parts as soon as this holds."""
    missing = sum(box is None for box in boxes)
    if total - missing < min_found * total:  # even if every other image shows its part
        return True
    return missing < len(boxes) and _window_shares(boxes).min() >= MAX_WINDOW_SHARE


def _window_shares(boxes: Sequence[Box | None]) -> np.ndarray:
    """Per axis, the largest extent of the parts found, with the margin, as a share of the side (up to 1)."""
    found = np.array([box for box in boxes if box is not None], dtype=np.float64).reshape(-1, 4)
    extents = np.stack([found[:, 1] - found[:, 0], found[:, 3] - found[:, 2]], axis=1)
    return np.minimum(1.0, CROP_MARGIN * extents.max(axis=0))


def part_window(size: tuple[int, int], box: Box | None, crop: Crop) -> Window:
    """The `crop` window of an image of `size` (height, width): at the crop's centre, or else centred on
    the part's `box` (the image's centre where none was found); moved inside the image."""
    height, width = size
    window_height = max(1, min(height, round(crop.height * height)))
    window_width = max(1, min(width, round(crop.width * width)))
    if crop.centre is not None:
        centre_row, centre_column = crop.centre[0] * height, crop.centre[1] * width
    elif box is not None:
        centre_row, centre_column = (box[0] + box[1]) / 2 * height, (box[2] + box[3]) / 2 * width
    else:
        centre_row, centre_column = height / 2, width / 2
    top = int(np.clip(round(centre_row - window_height / 2), 0, height - window_height))
    left = int(np.clip(round(centre_column - window_width / 2), 0, width - window_width))
    return Window(top, left, window_height, window_width)


def frame(pixels: np.ndarray, crop: Crop | None) -> tuple[np.ndarray, Window]:
    """An (H, W, 3) image cut to its window (a view), and the window; the whole image without one. The part
    is found only where the window follows it."""
    size = pixels.shape[:2]
    if crop is None:
        return pixels, Window.whole(size)
    window = part_window(size, part_box(pixels) if crop.centre is None else None, crop)
    return pixels[window.top : window.top + window.height, window.left : window.left + window.width], window


def framed(window_map: np.ndarray, window: Window, size: tuple[int, int]) -> np.ndarray:
    """A float map made for `window` (already at its size) placed in a map of `size` (height, width);
    outside the window, the map's lowest value: what the model did not see, it does not flag."""
    if window == Window.whole(size):
        return window_map
    full = np.full(size, window_map.min(), dtype=window_map.dtype)
    full[window.top : window.top + window.height, window.left : window.left + window.width] = window_map
    return full


def map_in_image(
    window_map: MapT,
    window: Window,
    size: tuple[int, int],
    target: tuple[int, int],
    resize: Callable[[MapT, tuple[int, int]], np.ndarray],
) -> np.ndarray:
    """A map made for `window` of an image of `size`, as a map of the whole image at `target` (height,
    width): `resize` (the caller's bilinear resize) brings it to the window's place at that size."""
    placed = window.scaled(size, target)
    return framed(resize(window_map, (placed.height, placed.width)), placed, target)


def describe_crop(crop: Crop | None) -> str:
    """The window in words, for `gaussad info` and reports."""
    if crop is None:
        return "whole image"
    where = "each image's part" if crop.centre is None else "the parts' place, the same in every image"
    return f"a window of {crop.height:.0%} x {crop.width:.0%} (height x width) around {where}"
