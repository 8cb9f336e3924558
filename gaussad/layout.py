"""Data sets in MVTec AD layout: which folders are categories, their training images, and their test
images with labels and ground-truth masks.

Layout of a category: train/good/*, test/<type>/* (good or a defect type),
ground_truth/<type>/<stem>_mask.png. Without ground truth (no mask for any defective image) a category is
for image metrics only; a ground truth that covers only some defective images is an error, as it most
likely is a broken data set. Light to import (no PyTorch, no scikit-learn), so that the command line names
a wrong folder before it loads the library.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gaussad.errors import GaussADError
from gaussad.images import IMAGE_EXTENSIONS


@dataclass
class LabeledImage:
    path: Path
    defect: str  # "good" or the defect type
    mask_path: Path | None

    @property
    def label(self) -> int:
        return int(self.defect != "good")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def is_category(folder: Path) -> bool:
    return (folder / "train" / "good").is_dir() and (folder / "test").is_dir()


def categories_in(root: Path) -> list[Path]:
    """root itself if it is a category in MVTec layout, else its sub-folders that are (none: [])."""
    if is_category(root):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and is_category(p)) if root.is_dir() else []


def find_categories(root: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """The category folders under root: root itself if it is one, else its sub-folders that are."""
    root = Path(root)
    if not root.is_dir():
        raise GaussADError(f"{root}: no such folder")
    found = categories_in(root)
    if not found:
        raise GaussADError(
            f"{root}: not in MVTec layout (no train/good and test/ here or in its sub-folders)"
        )
    if names:
        by_name = {p.name: p for p in found}
        missing = [name for name in names if name not in by_name]
        if missing:
            raise GaussADError(
                f"{root}: no category {', '.join(missing)} (found {', '.join(sorted(by_name))})"
            )
        found = [by_name[name] for name in names]
    return found


def find_category(root: str | Path, name: str | None = None) -> Path:
    """The one category to use under root (calibration takes one): named, or the only one there."""
    found = find_categories(root, [name] if name else None)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise GaussADError(
            f"{root}: holds {len(found)} categories ({names}); choose one with --category NAME"
        )
    return found[0]


def training_images(category: Path) -> list[Path]:
    images = _images_in(category / "train" / "good")
    if not images:
        raise GaussADError(f"{category / 'train' / 'good'}: no training images")
    return images


def list_test_images(category: Path) -> list[LabeledImage]:
    """Every test image with its defect type and mask: the masks of all defective images, or of none
    (image metrics only); a ground truth with only some of them is an error naming the first missing."""
    found = [
        LabeledImage(path, defect_dir.name, _mask_path(category, defect_dir.name, path))
        for defect_dir in sorted(p for p in (category / "test").iterdir() if p.is_dir())
        for path in _images_in(defect_dir)
    ]
    if not found:
        raise GaussADError(f"{category / 'test'}: no test images")
    if len({image.label for image in found}) < 2:
        raise GaussADError(f"{category / 'test'}: needs both good and defective images to evaluate")
    return _ground_truth(found)


def _mask_path(category: Path, defect: str, image: Path) -> Path | None:
    """Where a defective image's mask is in MVTec layout; None for a good image."""
    return None if defect == "good" else category / "ground_truth" / defect / f"{image.stem}_mask.png"


def _ground_truth(images: list[LabeledImage]) -> list[LabeledImage]:
    """The images as listed where every mask file exists, without masks where none does. A partial ground
    truth is an error rather than image-only: a lost mask should not silently drop the pixel metrics."""
    defective = [image for image in images if image.mask_path is not None]
    missing = [image for image in defective if not image.mask_path.is_file()]
    if not missing:
        return images
    if len(missing) == len(defective):
        return [LabeledImage(image.path, image.defect, None) for image in images]
    first = missing[0]
    raise GaussADError(
        f"{first.path}: defective test image without its mask {first.mask_path} "
        f"({len(defective) - len(missing)} of {len(defective)} have theirs: give every mask, or none "
        "for image metrics only)"
    )


def has_masks(images: Sequence[LabeledImage]) -> bool:
    """Whether pixel metrics can be measured: every defective image has its ground-truth mask."""
    return all(image.mask_path is not None for image in images if image.label == 1)
