"""Synthetic defects pasted into good images: the labels that choosing a model option without real
defects needs (`gaussad.selection`).

Two kinds, alternating over the images, each with its exact mask:
- `patch` (as CutPaste): a rectangle cut from another good image, pasted at another place; in aligned data
  a part in the wrong place, in textures a seam.
- `blend` (as DRAEM and NSA): an irregular blob, shaped by smoothed noise, where the image is blended with
  another good image rotated by a quarter turn: a local change of texture or colour.
Seeded and pure numpy, so a fit chooses the same way every run.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

KINDS = ("patch", "blend")
PATCH_AREA = (0.004, 0.04)  # share of the image a pasted rectangle covers
PATCH_ASPECT = (1 / 3, 3.0)
BLOB_AREA = (0.004, 0.04)  # share of the image a blended blob covers
BLOB_SMOOTHING = 0.06  # noise correlation length, as a share of the side
BLEND_OPACITY = (0.5, 1.0)


def synthetic_defects(
    images: np.ndarray, donors: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Defective copies of (N, H, W, 3) uint8 images, their (N, H, W) bool masks and each one's kind.

    Image i takes its foreign content from donors[(i + 1) % len(donors)] (another good image when donors
    are the images themselves), and even-numbered images get a patch, odd ones a blend."""
    rng = np.random.default_rng(seed)
    defective = images.copy()
    masks = np.zeros(images.shape[:3], dtype=bool)
    kinds: list[str] = []
    for index, image in enumerate(defective):
        donor = donors[(index + 1) % len(donors)]
        kind = KINDS[index % len(KINDS)]
        if kind == "patch":
            masks[index] = _paste_patch(image, donor, rng)
        else:
            masks[index] = _blend_blob(image, donor, rng)
        kinds.append(kind)
    return defective, masks, kinds


def _paste_patch(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paste a random rectangle of `donor` at a random place of `image` (in place); returns its mask."""
    height, width = image.shape[:2]
    area = rng.uniform(*PATCH_AREA) * height * width
    aspect = np.exp(rng.uniform(*np.log(PATCH_ASPECT)))
    patch_height = int(np.clip(round(np.sqrt(area * aspect)), 2, height - 1))
    patch_width = int(np.clip(round(area / patch_height), 2, width - 1))
    source_top, target_top = rng.integers(0, height - patch_height + 1, 2)
    source_left, target_left = rng.integers(0, width - patch_width + 1, 2)
    patch = donor[source_top : source_top + patch_height, source_left : source_left + patch_width]
    image[target_top : target_top + patch_height, target_left : target_left + patch_width] = patch
    mask = np.zeros((height, width), dtype=bool)
    mask[target_top : target_top + patch_height, target_left : target_left + patch_width] = True
    return mask


def _blend_blob(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blend a quarter-turned `donor` into `image` (in place) inside a noise-shaped blob; returns its mask."""
    height, width = image.shape[:2]
    noise = ndimage.gaussian_filter(rng.standard_normal((height, width)), BLOB_SMOOTHING * min(height, width))
    # The blob: the connected region around a random point, grown to the chosen area by thresholding.
    centre = (rng.integers(height // 8, height - height // 8), rng.integers(width // 8, width - width // 8))
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
