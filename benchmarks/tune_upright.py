r"""Turning every image upright before the model, where parts turn: the defaults on each set as it is and
on a copy of it whose images (and masks) were turned so that each one's part or texture stands the same
way.

    python benchmarks/tune_upright.py ~/.cache/gaussad/stress/magnetic_tile-rotate \
        ~/.cache/gaussad/stress/magnetic_tile-posed ~/.cache/gaussad/stress/magnetic_tile-small \
        ../shared/datasets/magnetic_tile --by texture part --out benchmarks/results/tune_upright

Two ways to find how an image is turned:
- `texture`: the dominant orientation of its gradients (the structure tensor summed over the whole image,
  after a Gaussian of 1.5 px), as the lines of a ground or brushed surface show it; the image is turned
  about its centre so that those lines stand vertical.
- `part`: the long axis of its part (`gaussad.framing.part_region` with the window's settings, found on
  every k-th pixel as the window finds it; the axis of the region's second moments); the image is turned
  about the part's centroid so that the axis stands vertical. An image whose part is not found stays as it
  is.
Either way the turn is known only up to half a turn (a line has no head). Turned pixels from outside the
image take the nearest edge pixel's value, masks 0; each copy lies under ~/.cache/gaussad/upright, made
once. Each set and its copies are evaluated with the defaults (`gaussad evaluate`); the copies' pixel
metrics are on their turned masks. Each finished row goes to OUT.json at once, and a rerun skips the rows
already there.
"""

from __future__ import annotations

import argparse
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_rows import Rows
from PIL import Image
from scipy import ndimage
from stress_variants import save_image

from gaussad.evaluation import evaluate_category
from gaussad.framing import FIND_SIDE, WINDOW_PART_DOMINANCE, WINDOW_PART_MIN_SHARE, part_region
from gaussad.images import read_image
from gaussad.layout import list_test_images, training_images
from gaussad.model import GaussAD
from gaussad.tuning import cpu_tuning

UPRIGHT = Path.home() / ".cache" / "gaussad" / "upright"
TEXTURE_SMOOTHING = 1.5  # pixels: the Gaussian before the gradients, so that sensor noise does not lead
METRICS = ("image_auroc", "pixel_auroc", "aupro", "false_alarm_rate", "miss_rate")
AS_IT_IS = "as it is"
Turn = tuple[float, tuple[float, float]]  # radians from vertical, and the (row, column) turned about


def texture_turn(pixels: np.ndarray) -> Turn:
    """How far the lines of an (H, W, 3) image's texture stand from vertical, and its centre."""
    grey = ndimage.gaussian_filter(pixels.astype(np.float64).mean(axis=-1), TEXTURE_SMOOTHING)
    rows, columns = ndimage.sobel(grey, 0), ndimage.sobel(grey, 1)
    # The gradients' dominant direction, across the lines, from the column axis towards the rows (its angle
    # doubled, so that opposite gradients agree); the lines stand as far from vertical the other way.
    across = 0.5 * math.atan2(2 * (columns * rows).sum(), (columns**2).sum() - (rows**2).sum())
    height, width = grey.shape
    return -across, ((height - 1) / 2, (width - 1) / 2)


def part_turn(pixels: np.ndarray) -> Turn | None:
    """How far the long axis of an (H, W, 3) image's part stands from vertical, and the part's centroid;
    None where no part is found."""
    step = max(1, min(pixels.shape[:2]) // FIND_SIDE)
    region = part_region(pixels[::step, ::step], WINDOW_PART_MIN_SHARE, WINDOW_PART_DOMINANCE)
    if region is None:
        return None
    rows, columns = (np.nonzero(region)[axis] * step + (step - 1) / 2 for axis in (0, 1))
    _, axes = np.linalg.eigh(np.cov(np.stack([rows, columns])))
    along_rows, along_columns = axes[:, -1]  # the long axis, as a step in rows and columns
    return math.atan2(along_columns, along_rows), (float(rows.mean()), float(columns.mean()))


def turned(values: np.ndarray, turn: Turn, order: int, mode: str) -> np.ndarray:
    """An (H, W) or (H, W, C) array turned by `turn`'s angle about its point, what stood at that angle from
    vertical then standing vertical; outside the array, `mode` as scipy's (0 for `constant`)."""
    angle, centre = turn
    cosine, sine = math.cos(angle), math.sin(angle)
    matrix = np.array([[cosine, -sine], [sine, cosine]])  # output (row, column) -> input, about the centre
    offset = np.asarray(centre) - matrix @ np.asarray(centre)
    planes = values[..., None] if values.ndim == 2 else values
    out = np.stack(
        [
            ndimage.affine_transform(planes[..., c], matrix, offset, order=order, mode=mode)
            for c in range(planes.shape[-1])
        ],
        axis=-1,
    )
    return out[..., 0] if values.ndim == 2 else out


FINDERS: dict[str, Callable[[np.ndarray], Turn | None]] = {"texture": texture_turn, "part": part_turn}


def write_upright(category: Path, by: str, root: Path = UPRIGHT) -> Path:
    """The copy of `category` turned upright `by` one finder, in its layout, under `root`, made once."""
    target = root / f"{category.name}-{by}"
    if target.exists():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
    find = FINDERS[by]
    images = [(path, "train/good", None) for path in training_images(category)]
    images += [(test.path, f"test/{test.defect}", test.mask_path) for test in list_test_images(category)]
    for path, folder, mask_path in images:
        pixels = np.asarray(read_image(path))
        turn = find(pixels)
        save_image(
            pixels if turn is None else turned(pixels, turn, 1, "nearest"),
            partial / folder / f"{path.stem}.png",
        )
        if mask_path is not None:
            mask = np.asarray(Image.open(mask_path).convert("L"))
            mask = mask if turn is None else turned(mask, turn, 0, "constant")
            save_image(mask, partial / "ground_truth" / Path(folder).name / mask_path.name)
    partial.rename(target)
    return target


def run(category: Path, way: str) -> dict[str, Any]:
    """One `gaussad evaluate` with the defaults, of the set as it is or of its copy turned upright `way`:
    its metrics."""
    result = evaluate_category(GaussAD, category if way == AS_IT_IS else write_upright(category, way)).result
    return {metric: getattr(result, metric) for metric in METRICS}


def table(rows: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One line per set and way: the metrics, and image AUROC against the set as it is."""
    lines = [
        "| set | turned upright by | image AUROC | pixel AUROC | AUPRO | false alarms | misses "
        "| image AUROC against as it is |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dataset, by_way in rows.items():
        plain = by_way.get(AS_IT_IS)
        for way, row in by_way.items():
            difference = (
                ""
                if plain is None or way == AS_IT_IS
                else f"{row['image_auroc'] - plain['image_auroc']:+.4f}"
            )
            lines.append(
                f"| {dataset} | {way} | {row['image_auroc']:.4f} | {row['pixel_auroc']:.4f} | "
                f"{row['aupro']:.4f} | {row['false_alarm_rate']:.1%} | {row['miss_rate']:.1%} | "
                f"{difference} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="+", type=Path)
    parser.add_argument("--by", nargs="+", choices=tuple(FINDERS), default=list(FINDERS))
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    rows = Rows(args.out)
    with cpu_tuning():
        for category in args.categories:
            for way in (AS_IT_IS, *args.by):
                rows.ensure((category.name, way), run, category, way)
    header = "# Images turned upright before the model\n\n" + __doc__.split("\n\n", 1)[1]
    rows.write_table(f"{header}\n{table(rows.rows)}")


if __name__ == "__main__":
    main()
