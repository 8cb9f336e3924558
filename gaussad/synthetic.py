"""Synthetic defects pasted into good images: the labels that choosing a model option without real
defects needs (`gaussad.selection`).

Two kinds, alternating over the images, each with its exact mask:
- `patch` (as CutPaste): a rectangle cut from the image itself, pasted at another place; in aligned data
  a part in the wrong place, in textures a seam.
- `blend` (as DRAEM and NSA): an irregular blob, shaped by smoothed noise, where the image is blended with
  another good image rotated by a quarter turn: a local change of texture or colour.
Both are placed where the image has detail (`_centre`), so that on a small part on a plain background
they land on the part, as real defects do, and not on the background. Where the part lies on a background
(`part_region`), a patch is cut from the part and lies wholly on it: one half off the part puts the part's
content on the background, a place a per-position Gaussian knows to be background, and one cut from the
background puts its grain on the part. Real defects are neither, nor are they the differences between good
images (their light, their pose), which a patch from another image would carry. Seeded and pure numpy, so
a fit chooses the same way every run.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from gaussad.framing import part_region

KINDS = ("patch", "blend")
PATCH_AREA = (0.004, 0.04)  # share of the image a pasted rectangle covers
PATCH_ASPECT = (1 / 3, 3.0)
BLOB_AREA = (0.004, 0.04)  # share of the image a blended blob covers
BLOB_SMOOTHING = 0.06  # noise correlation length, as a share of the side
BLEND_OPACITY = (0.5, 1.0)
DETAIL_SMOOTHING = 0.05  # how far a place's detail is averaged, as a share of the side
DETAIL_GRID = 56  # cells a side on which the detail is measured
DETAIL_FLOOR = 0.05  # of the mean detail, so that plain regions are rare places, not impossible ones


def synthetic_defects(
    images: np.ndarray, donors: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Defective copies of (N, H, W, 3) uint8 images, their (N, H, W) bool masks and each one's kind.

    Even-numbered images get a patch of their own content, odd ones a blend with donors[(i + 1) %
    len(donors)] (another good image when donors are the images themselves)."""
    rng = np.random.default_rng(seed)
    defective = images.copy()
    masks = np.zeros(images.shape[:3], dtype=bool)
    kinds: list[str] = []
    for index, image in enumerate(defective):
        kind = KINDS[index % len(KINDS)]
        if kind == "patch":
            masks[index] = _paste_patch(image, rng)
        else:
            masks[index] = _blend_blob(image, donors[(index + 1) % len(donors)], rng)
        kinds.append(kind)
    return defective, masks, kinds


def _paste_patch(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cut a random rectangle of `image` and paste it at another random place (both on its part, if it
    has one), in place; returns its mask."""
    height, width = image.shape[:2]
    area = rng.uniform(*PATCH_AREA) * height * width
    aspect = np.exp(rng.uniform(*np.log(PATCH_ASPECT)))
    patch_height = int(np.clip(round(np.sqrt(area * aspect)), 2, height - 1))
    patch_width = int(np.clip(round(area / patch_height), 2, width - 1))
    region = part_region(image)
    source_top, source_left = _corner_on_part(image, region, (patch_height, patch_width), rng)
    target_top, target_left = _corner_on_part(image, region, (patch_height, patch_width), rng)
    patch = image[source_top : source_top + patch_height, source_left : source_left + patch_width].copy()
    image[target_top : target_top + patch_height, target_left : target_left + patch_width] = patch
    mask = np.zeros((height, width), dtype=bool)
    mask[target_top : target_top + patch_height, target_left : target_left + patch_width] = True
    return mask


def _blend_blob(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blend a quarter-turned `donor` into `image` (in place) inside a noise-shaped blob; returns its mask."""
    height, width = image.shape[:2]
    noise = ndimage.gaussian_filter(rng.standard_normal((height, width)), BLOB_SMOOTHING * min(height, width))
    # The blob: the connected region around a random point, grown to the chosen area by thresholding.
    centre = _centre(image, rng)
    distance = np.hypot(
        *np.meshgrid(np.arange(height) - centre[0], np.arange(width) - centre[1], indexing="ij")
    )
    field = noise / noise.std() - distance / (0.15 * min(height, width))
    share = rng.uniform(*BLOB_AREA)
    mask = field >= np.quantile(field, 1.0 - share)
    labels, _ = ndimage.label(mask)
    mask = labels == labels[np.unravel_index(np.argmax(np.where(mask, field, -np.inf)), mask.shape)]
    turned = np.rot90(donor, k=int(rng.integers(1, 4)))
    if turned.shape != image.shape:  # a non-square donor: flip instead of turning
        turned = donor[::-1, ::-1]
    opacity = rng.uniform(*BLEND_OPACITY)
    mixed = (1 - opacity) * image[mask] + opacity * turned[mask]
    image[mask] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return mask


def _centre(image: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """A random place, drawn in proportion to the image's local detail (its gradient's magnitude,
    averaged nearby): a part's surface rather than a plain background; about uniform over a texture.
    The detail is measured on every `step`-th pixel (a grid of about `DETAIL_GRID` cells a side), which is
    as good for placing a defect and 16 times cheaper at 224 px."""
    step = max(1, min(image.shape[:2]) // DETAIL_GRID)
    grey = image[::step, ::step].astype(np.float32).mean(axis=-1)
    detail = np.hypot(ndimage.sobel(grey, axis=0), ndimage.sobel(grey, axis=1))
    detail = ndimage.gaussian_filter(detail, DETAIL_SMOOTHING * min(grey.shape))
    weights = (detail + DETAIL_FLOOR * detail.mean() + 1e-12).ravel().astype(np.float64)
    cell = rng.choice(weights.size, p=weights / weights.sum())
    row, column = np.unravel_index(cell, grey.shape)
    height, width = image.shape[:2]
    row = min(height - 1, row * step + int(rng.integers(step)))
    column = min(width - 1, column * step + int(rng.integers(step)))
    return int(row), int(column)


def _corner(image: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    """The top-left corner of a `size` rectangle centred at a `_centre`, moved inside the image."""
    return _corner_around(_centre(image, rng), size, image.shape[:2])


def _corner_around(centre: tuple[int, int], size: tuple[int, int], shape: tuple[int, int]) -> tuple[int, int]:
    """The top-left corner of a `size` rectangle centred at `centre`, moved inside an image of `shape`."""
    top = int(np.clip(centre[0] - size[0] // 2, 0, shape[0] - size[0]))
    left = int(np.clip(centre[1] - size[1] // 2, 0, shape[1] - size[1]))
    return top, left


def _corner_on_part(
    image: np.ndarray, region: np.ndarray | None, size: tuple[int, int], rng: np.random.Generator
) -> tuple[int, int]:
    """The top-left corner of a `size` rectangle wholly on the image's part (its `part_region`), drawn
    uniformly among those places; a `_corner` where the image has no part on a background, or none the
    rectangle fits in."""
    if region is not None:
        # Centres whose rectangle lies wholly in the region (a minimum over the rectangle around each).
        fits = ndimage.minimum_filter(region, size=size, mode="constant", cval=False)
        if fits.any():
            places = np.flatnonzero(fits)
            row, column = np.unravel_index(places[rng.integers(len(places))], fits.shape)
            return _corner_around((int(row), int(column)), size, image.shape[:2])
    return _corner(image, size, rng)
