"""Stress variants of data sets in MVTec AD layout: development data that breaks the assumptions of a
default, written outside the repository.

- `rotate`: every training and test image, and its mask with the same transform, rotated by a random angle
  and shifted by up to a tenth of its size (seeded; the edge pixels continue past the borders), so that a
  part no longer sits in the same place in every image.
- `crop`: a random window of aspect 2:1 (wide) or 1:2 (tall), chosen per image, holding the whole defect
  where the mask allows; the part is cut differently in every image and the input is no longer square.
- `small`: the whole image shrunk to 40-60% of its side, turned by a random angle and placed at random on a
  canvas of its former size, filled with the colour of its border: a small part, anywhere, on a plain
  background (as a screw on a table, or a tire on a tray), whose defects shrink with it.
- `scene`: the same small part on a background with texture and uneven light, as a real tray or table
  has: grain of a pixel or two and a slow change of brightness across the frame, both random per image.
- `strip`: a tall window of height 5 : width 2 in every image (the shape of KolektorSDD's images), placed
  at random where it holds the whole defect: one non-square shape for the whole set, which the square
  input squashes.
- `posed`: the `scene`'s small part and background, turned at random but placed near the frame's centre
  (within a tenth of its side): a part in about the same place in a new pose every time, as a screw or a
  tire on a fixture, where the background keeps its place and the part does not.
- `fixture`: the part at one size, turned at random about the frame's centre (within 2% of its side), on a
  background whose grain and light are the same in every image (as a tire on a fixture in a fixed
  station): every position of the background looks the same in every image, and the part turns in place.
- `tiny`: the `scene`'s part and background, the part shrunk to 20-30% of the side: a part a few hundred
  pixels across in a large frame, as MVTec AD's screws are, whose defects the squashed input all but
  erases.
- `count`: the `tiny` images, and two logical anomalies besides the structural ones: test images of the
  defect type `extra` hold two good parts where one belongs (as a second screw in a bag, or an extra item
  in a box), each placed as `tiny` places one, apart, the mask on the second; those of `missing` hold the
  background alone (an empty tray or fixture), with an empty mask: there is nothing to point at. Every
  patch of such an image is normal: only what the image holds as a whole is not.
- `few`: the images as they are, but only `FEW_IMAGES` of the training images, drawn at random (seeded):
  a line's first model, fitted on a few dozen good parts, where every Gaussian that pools an image into
  one vector has one sample per image to learn from.
- `light`: every image lit otherwise, each at random: its exposure (a gain on every grey level), the
  camera's response (a gamma), light that falls off across the frame in a random direction, and, where
  the image has colour, its white balance; the part stays where it is, and the mask with it. A line whose
  lamps age, whose ambient light changes with the hour, or whose camera sets its own exposure.
- `dirty`: the images as they are, but as many defective images as `DIRTY_SHARE` of the training images,
  drawn at random (seeded) from the test set, moved into the training images: a folder of "good" parts
  that a few bad ones slipped into, as happens when a line collects its own training images.
- `focus`: every image as a camera out of focus by a random amount takes it, with a random level of sensor
  noise: a blur of up to `FOCUS_BLUR` of the image's short side and noise of up to `FOCUS_NOISE` grey
  levels; the part stays where it is, and the mask with it.

    python benchmarks/stress_variants.py ../shared/datasets/mvtec_ad/bottle ../shared/datasets/magnetic_tile \
        --variants rotate crop small scene strip posed fixture tiny count few light dirty focus \
        --out ~/.cache/gaussad/stress

writes `<out>/<category>-<variant>/` for each category and variant. Defective images whose defect leaves
the window are dropped from the test set (their mask would be empty).
"""

from __future__ import annotations

import argparse
import functools
import math
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from gaussad.images import read_image
from gaussad.layout import LabeledImage, list_test_images, training_images

MAX_SHIFT = 0.1  # of the image's side
SMALL_SCALES = (0.4, 0.6)  # the `small` variant's range of sizes, as a share of the image's side
TINY_SCALES = (0.2, 0.3)  # the `tiny` variant's
SCENE_LIGHT = 20.0  # the `scene` background's largest change of brightness, in grey levels
SCENE_GRAIN = 6.0  # the standard deviation of its grain, in grey levels
SCENE_LIGHT_CELLS = 32  # image side / the light's correlation length
STRIP_ASPECT = 2.5  # the `strip` variant's height / width
FIXTURE_SCALE = 0.6  # the `fixture` variant's part, as a share of the image's side
FIXTURE_SHIFT = 0.02  # how far from the frame's centre it may sit, as a share of the side
FIXTURE_SIDE = 256  # its background is drawn once at this side, then resized to each image
FIXTURE_SEED = 7  # and from this seed, whatever the image
FEW_IMAGES = 30  # the `few` variant's training images
LIGHT_GAIN = (0.75, 1.25)  # the `light` variant's range of exposure, a factor on every grey level
LIGHT_GAMMA = (0.8, 1.25)  # its range of gammas, drawn uniformly in log
LIGHT_FALLOFF = 0.3  # its largest change of brightness from one side of the frame to the other, as a share
LIGHT_CAST = 0.05  # each colour channel's own factor lies within this share of 1
DIRTY_SHARE = 0.05  # the `dirty` variant's defective training images, as a share of the good ones
FOCUS_BLUR = 0.005  # the `focus` variant's largest blur (a Gaussian's sigma), as a share of the short side
FOCUS_NOISE = 6.0  # its largest sensor noise (a standard deviation), in grey levels


def rotate(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
    """Rotate about the centre by a random angle and shift; edge pixels fill the borders; the mask follows."""
    angle = rng.uniform(0.0, 360.0)
    height, width = image.shape[:2]
    shift = rng.uniform(-MAX_SHIFT, MAX_SHIFT, 2) * (height, width)
    matrix = _turn(math.radians(angle))
    centre = np.array([(height - 1) / 2, (width - 1) / 2])
    offset = centre - matrix @ (centre + shift)  # output (y, x) -> input matrix @ (y, x) + offset
    return _warp(image, mask, matrix, offset, "nearest", np.zeros(3))


def unchanged(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
    """The image and its mask as they are (the `few` variant changes how many training images there are)."""
    return image, mask


def light(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
    """Light the image otherwise: a random gamma (`LIGHT_GAMMA`), gain (`LIGHT_GAIN`), a linear fall-off
    across the frame in a random direction (up to `LIGHT_FALLOFF`) and, where the channels differ, a
    factor per channel (`LIGHT_CAST`); values beyond white clip, as an over-exposed camera's do. The mask
    is unchanged."""
    gamma = math.exp(rng.uniform(*np.log(LIGHT_GAMMA)))
    gain = rng.uniform(*LIGHT_GAIN)
    direction = rng.uniform(0.0, 2 * math.pi)
    cast = 1.0 + rng.uniform(-LIGHT_CAST, LIGHT_CAST, 3)
    height, width = image.shape[:2]
    rows, columns = np.meshgrid(np.linspace(-0.5, 0.5, height), np.linspace(-0.5, 0.5, width), indexing="ij")
    along = math.cos(direction) * rows + math.sin(direction) * columns  # within +-0.5 * sqrt(2)
    falloff = 1.0 + LIGHT_FALLOFF * along / math.sqrt(2)
    factor = gain * falloff[..., None] * (cast if _coloured(image) else np.ones(3))
    lit = 255.0 * (image.astype(np.float64) / 255.0) ** gamma * factor
    return np.clip(np.rint(lit), 0, 255).astype(np.uint8), mask


def focus(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
    """Blur by a random sigma (up to `FOCUS_BLUR` of the short side) and add noise of a random level (up to
    `FOCUS_NOISE`), drawn per channel where the image has colour and alike in every channel where it has
    none. The mask is unchanged."""
    sigma = rng.uniform(0.0, FOCUS_BLUR) * min(image.shape[:2])
    level = rng.uniform(0.0, FOCUS_NOISE)
    blurred = ndimage.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0.0))
    channels = 3 if _coloured(image) else 1
    noise = rng.normal(0.0, level, (*image.shape[:2], channels)).astype(np.float32)
    return np.clip(np.rint(blurred + noise), 0, 255).astype(np.uint8), mask


def _coloured(image: np.ndarray) -> bool:
    """Whether an (H, W, 3) image's channels differ anywhere (a colour camera's, not a monochrome one's)."""
    return bool(np.ptp(image, axis=-1).any())


def small(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
    """Shrink by a random scale, turn by a random angle and place at random inside the frame, on the median
    colour of the image's border; the mask follows."""
    matrix, offset, border = _placement(image, rng)
    return _warp(image, mask, matrix, offset, "constant", border)


def scene(
    image: np.ndarray,
    mask: np.ndarray | None,
    rng: np.random.Generator,
    centred: bool = False,
    scales: tuple[float, float] = SMALL_SCALES,
):
    """As `small`, on the border's colour with grain and uneven light (`_background`) instead of a plain
    fill (`centred`: placed near the frame's centre; `scales`: the part's sizes); the mask follows."""
    matrix, offset, border = _placement(image, rng, centred, scales)
    return _on_background(image, mask, matrix, offset, _background(image.shape[:2], border, rng))


def fixture(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
    """The part shrunk to `FIXTURE_SCALE`, turned at random and placed within `FIXTURE_SHIFT` of the
    frame's centre, on the border's colour with the grain and light of `_fixed_background`; the mask
    follows."""
    matrix, offset, border = _placement(image, rng, True, (FIXTURE_SCALE, FIXTURE_SCALE), FIXTURE_SHIFT)
    return _on_background(image, mask, matrix, offset, border + _fixed_background(image.shape[:2]))


def _on_background(
    image: np.ndarray,
    mask: np.ndarray | None,
    matrix: np.ndarray,
    offset: np.ndarray,
    background: np.ndarray,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The warped part over `background` (H, W, 3) where the warp leaves the frame uncovered, as uint8,
    and the warped mask."""
    part, moved = _warp(image, mask, matrix, offset, "constant", np.zeros(3), rounded=False)
    coverage = ndimage.affine_transform(
        np.ones(image.shape[:2], np.float32), matrix, offset, order=1, mode="constant", cval=0.0
    )
    composed = part + (1.0 - coverage)[..., None] * background
    return np.clip(np.rint(composed), 0, 255).astype(np.uint8), moved


def posed(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
    """As `scene`, placed within `MAX_SHIFT` of the frame's side from its centre; the mask follows."""
    return scene(image, mask, rng, centred=True)


def tiny(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
    """As `scene`, the part shrunk to 20-30% of the side (`TINY_SCALES`); the mask follows."""
    return scene(image, mask, rng, scales=TINY_SCALES)


def _placement(
    image: np.ndarray,
    rng: np.random.Generator,
    centred: bool = False,
    scales: tuple[float, float] = SMALL_SCALES,
    shift: float = MAX_SHIFT,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random shrink (within `scales`), turn and place (anywhere the part fits, or within `shift` of the
    side from the centre if `centred`) for `small`, `scene`, `posed` and `fixture`: the warp's matrix and
    offset (output (y, x) -> input matrix @ (y, x) + offset), and the median colour of the image's border."""
    scale = rng.uniform(*scales)
    angle = math.radians(rng.uniform(0.0, 360.0))
    height, width = image.shape[:2]
    size = np.array([height, width], dtype=float)
    if centred:
        placed = (size - 1) / 2 + rng.uniform(-shift, shift, 2) * size
    else:
        reach = scale * np.hypot(height - 1, width - 1) / 2  # the turned part's farthest corner
        placed = np.array([rng.uniform(min(reach, s / 2), max(s - 1 - reach, s / 2)) for s in size])
    matrix = _turn(angle) / scale
    offset = (size - 1) / 2 - matrix @ placed
    return matrix, offset, _border_colour(image)


def _border_colour(image: np.ndarray) -> np.ndarray:
    """The median colour of the image's outermost rows and columns: what its part lies on."""
    return np.median(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]), axis=0)


def _background(shape: tuple[int, int], colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A (H, W, 3) float background: `colour`, plus light that changes slowly across the frame (at most
    `SCENE_LIGHT` grey levels) and grain (`SCENE_GRAIN`), the same in every channel."""
    height, width = shape
    coarse = ndimage.gaussian_filter(
        rng.standard_normal((max(2, height // SCENE_LIGHT_CELLS), max(2, width // SCENE_LIGHT_CELLS))), 1.0
    )
    light = ndimage.zoom(coarse, (height / coarse.shape[0], width / coarse.shape[1]), order=1)
    light = light[:height, :width] * SCENE_LIGHT / (np.abs(light).max() + 1e-9)
    grain = ndimage.gaussian_filter(rng.standard_normal((height, width)), 1.0)
    grain *= SCENE_GRAIN / (grain.std() + 1e-9)
    return colour[None, None, :] + (light + grain)[..., None]


@functools.cache
def _fixture_pattern() -> np.ndarray:
    """The `fixture` background's grain and light (`FIXTURE_SIDE` square, 3 channels, about zero mean),
    drawn from `FIXTURE_SEED`: the same for every image of every data set."""
    return _background((FIXTURE_SIDE, FIXTURE_SIDE), np.zeros(3), np.random.default_rng(FIXTURE_SEED))


def _fixed_background(shape: tuple[int, int]) -> np.ndarray:
    """`_fixture_pattern` resized (bilinear) to `shape`, so that images of any size share one background."""
    height, width = shape
    zoom = (height / FIXTURE_SIDE, width / FIXTURE_SIDE, 1.0)
    return ndimage.zoom(_fixture_pattern(), zoom, order=1, grid_mode=True, mode="nearest")


def two_parts(
    first: np.ndarray, second: np.ndarray, rng: np.random.Generator, tries: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Two parts in one frame of `first`'s size, each shrunk, turned and placed as `tiny` places one, on
    the `scene`'s background, the second (resized to the frame) where it covers none of the first (or, in
    `tries` draws, the least); and the mask of the second's footprint."""
    shape = first.shape[:2]
    second = np.asarray(Image.fromarray(second).resize(shape[::-1], Image.Resampling.BILINEAR))
    full = np.full(shape, 255, np.uint8)
    matrix, offset, border = _placement(first, rng, scales=TINY_SCALES)
    composed, footprint = _on_background(first, full, matrix, offset, _background(shape, border, rng))
    best = None
    for _ in range(tries):
        placement = _placement(second, rng, scales=TINY_SCALES)
        other = ndimage.affine_transform(full, placement[0], placement[1], order=0, cval=0)
        overlap = np.logical_and(footprint, other).sum()
        if best is None or overlap < best[0]:
            best = (overlap, placement)
        if overlap == 0:
            break
    matrix, offset, _ = best[1]
    return _on_background(second, full, matrix, offset, composed.astype(np.float32))


def no_part(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The `scene`'s background alone, in the colour of the image's border at its size, and an empty mask:
    the frame with its part missing."""
    background = _background(image.shape[:2], _border_colour(image), rng)
    return np.clip(np.rint(background), 0, 255).astype(np.uint8), np.zeros(image.shape[:2], np.uint8)


def _turn(radians: float) -> np.ndarray:
    """The 2 x 2 rotation by `radians` of (y, x) coordinates."""
    cos, sin = math.cos(radians), math.sin(radians)
    return np.array([[cos, -sin], [sin, cos]])


def _warp(
    image: np.ndarray,
    mask: np.ndarray | None,
    matrix: np.ndarray,
    offset: np.ndarray,
    mode: str,
    fill: np.ndarray,
    rounded: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The image (bilinear, per channel) and its mask (nearest) mapped output (y, x) -> input matrix @ (y, x)
    + offset; outside the input, `mode` as scipy's, with channel c filled by fill[c] and the mask by 0. The
    image comes back as uint8, or as float32 unrounded for further composing."""

    def warp(values: np.ndarray, order: int, cval: float) -> np.ndarray:
        return ndimage.affine_transform(values, matrix, offset, order=order, mode=mode, cval=cval)

    channels = np.stack([warp(image[..., c].astype(np.float32), 1, fill[c]) for c in range(3)], axis=-1)
    warped = np.clip(np.rint(channels), 0, 255).astype(np.uint8) if rounded else channels
    return warped, None if mask is None else warp(mask, 0, 0)


def crop(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
    """A random 2:1 or 1:2 window as large as the image allows, placed to hold the whole defect if it can."""
    aspect = 0.5 if rng.random() < 0.5 else 2.0
    return _window(image, mask, rng, aspect)


def strip(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
    """A tall window of height 5 : width 2 (KolektorSDD's shape) as large as the image allows, placed to
    hold the whole defect if it can: the same non-square shape in every image."""
    return _window(image, mask, rng, STRIP_ASPECT)


def _window(image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator, aspect: float):
    """A window of height / width `aspect`, as large as the image allows, at a random place that holds the
    whole defect where the mask allows."""
    height, width = image.shape[:2]
    if height / width > aspect:  # the image is taller than the window: its width bounds it
        window_h, window_w = min(height, int(width * aspect)), width
    else:
        window_h, window_w = height, min(width, int(height / aspect))
    window_h, window_w = max(1, window_h), max(1, window_w)
    low, high = [0, 0], [height - window_h, width - window_w]
    if mask is not None and mask.any():
        rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        for axis, (first, last, size) in enumerate(
            ((rows[0], rows[-1], window_h), (columns[0], columns[-1], window_w))
        ):
            low[axis] = max(low[axis], min(last + 1 - size, high[axis]))
            high[axis] = min(high[axis], max(first, low[axis]))
    top, left = (int(rng.integers(lo, max(lo, hi) + 1)) for lo, hi in zip(low, high, strict=True))
    box = (slice(top, top + window_h), slice(left, left + window_w))
    return image[box], None if mask is None else mask[box]


TRANSFORMS = {
    "rotate": rotate,
    "crop": crop,
    "small": small,
    "scene": scene,
    "strip": strip,
    "posed": posed,
    "fixture": fixture,
    "tiny": tiny,
    "count": tiny,
    "few": unchanged,
    "light": light,
    "dirty": unchanged,
    "focus": focus,  # new variants go last: each variant's seed is its place in this list
}
VARIANTS = tuple(TRANSFORMS)
EXTRA, MISSING = "extra", "missing"  # the `count` variant's logical defect types


def write_variant(category: Path, variant: str, out: Path, seed: int) -> Path:
    """The variant of one category, in MVTec AD layout, under `out`."""
    transform = TRANSFORMS[variant]
    rng = np.random.default_rng(seed)
    target = out / f"{category.name}-{variant}"
    train = [(path, path.stem) for path in training_images(category)]
    if variant == "few" and len(train) > FEW_IMAGES:
        train = [train[index] for index in sorted(rng.choice(len(train), FEW_IMAGES, replace=False))]
    tests = list_test_images(category)
    if variant == "dirty":  # named by type too: a test image's name may be a training image's
        tests, slipped = _slipped_in(tests, round(DIRTY_SHARE * len(train)), rng)
        train += [(test.path, f"{test.defect}_{test.path.stem}") for test in slipped]
    for path, name in train:
        pixels, _ = transform(np.asarray(read_image(path)), None, rng)
        save_image(pixels, target / "train" / "good" / f"{name}.png")
    kept = dropped = 0
    for test in tests:
        mask = None
        if test.mask_path is not None:
            mask = (np.asarray(Image.open(test.mask_path).convert("L")) > 127).astype(np.uint8) * 255
        pixels, moved = transform(np.asarray(read_image(test.path)), mask, rng)
        if mask is not None and mask.any() and not moved.any():
            dropped += 1
            continue
        save_image(pixels, target / "test" / test.defect / f"{test.path.stem}.png")
        if moved is not None:
            save_image(moved, target / "ground_truth" / test.defect / f"{test.path.stem}_mask.png")
        kept += 1
    if variant == "count":
        kept += _write_logical_anomalies(category, target, rng)
    print(f"{target}: {kept} test images ({dropped} defective dropped: defect outside the window)")
    return target


def _slipped_in(
    tests: list[LabeledImage], count: int, rng: np.random.Generator
) -> tuple[list[LabeledImage], list[LabeledImage]]:
    """The test images less `count` defective ones drawn at random (at least one stays), and those."""
    defective = [index for index, test in enumerate(tests) if test.label == 1]
    drawn = set(rng.choice(defective, min(count, len(defective) - 1), replace=False).tolist())
    kept = [test for index, test in enumerate(tests) if index not in drawn]
    return kept, [tests[index] for index in sorted(drawn)]


def _write_logical_anomalies(category: Path, target: Path, rng: np.random.Generator) -> int:
    """The `count` variant's logical anomalies, per good test image: it and the other good test image
    nearest to it in aspect (so that the second is little distorted) as `two_parts`, and its frame with no
    part (`no_part`); how many images."""
    goods = [test.path for test in list_test_images(category) if test.defect == "good"]
    images = [np.asarray(read_image(path)) for path in goods]
    aspects = np.array([image.shape[0] / image.shape[1] for image in images])
    for index, (path, image) in enumerate(zip(goods, images, strict=True)):
        distance = np.abs(np.log(aspects / aspects[index]))
        distance[index] = np.inf
        for defect, (pixels, mask) in (
            (EXTRA, two_parts(image, images[int(np.argmin(distance))], rng)),
            (MISSING, no_part(image, rng)),
        ):
            save_image(pixels, target / "test" / defect / f"{path.stem}.png")
            save_image(mask, target / "ground_truth" / defect / f"{path.stem}_mask.png")
    return 2 * len(goods)


def save_image(pixels: np.ndarray, path: Path) -> None:
    """An image or mask written as PNG, its folder made first (`tune_upright.py` writes its copies so too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="+", type=Path, help="category folders in MVTec AD layout")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache" / "gaussad" / "stress")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for category in args.categories:
        for variant in args.variants:
            write_variant(category, variant, args.out, args.seed + VARIANTS.index(variant))


if __name__ == "__main__":
    main()
