"""Every model option in one place: its default, its allowed values and its help line.

`ModelConfig` is frozen and validated. The CLI builds its model options from `MODEL_OPTIONS`, `GaussAD`
takes its defaults from it and a model folder saves it whole, so the list is stated once. Importable
without torch: the CLI's help and argument errors answer at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gaussad.errors import GaussADError

REDUCTIONS: tuple[str, ...] = ("opca", "pca", "none")
LOCALIZATIONS: tuple[str, ...] = ("hybrid", "shared", "per-position", "auto")
IMAGE_SCORES: tuple[str, ...] = ("pooled", "map", "combined", "auto")
# Where a fit keeps the training features until its Gaussians are finished (`gaussad.store`): a run-time
# setting, not a model option.
FEATURE_STORES: tuple[str, ...] = ("disk", "memory", "none")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
CROPS: tuple[str, ...] = ("part", "none")
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 4096  # far beyond what a 2-core CPU scores in reasonable time; guards saved models
ImageSize = int | tuple[int, int]  # a square input's side, or (height, width)

DEFAULT_BATCH_SIZE = 16  # as fast as 32 on CPU with the allocator kept warm, 150 MiB less
DEFAULT_WORKERS = 2  # threads decoding images


def _option(help: str, default: Any = None, choices: tuple[str, ...] = (), kind: str = "") -> Any:
    """A dataclass field with what the CLI needs to offer it: help, choices, and how to parse it."""
    return field(default=default, metadata={"help": help, "choices": choices, "kind": kind})


@dataclass(frozen=True)
class ModelConfig:
    """The options that define a fitted model (run-time settings such as the device are not among them).

    None means "the backbone's default" for levels and the input size; they are resolved at fit time and
    the fitted model keeps what it used.
    """

    backbone: str = _option(
        "efficientnet_lite0/1/2 (weights embedded) or any timm model", "efficientnet_lite0"
    )
    weights: str | None = _option(
        "local weights file (.pth or .safetensors) for a timm backbone", kind="path"
    )
    levels: tuple[int, ...] | None = _option(
        "levels for the image score (default: the backbone's)", kind="levels"
    )
    map_levels: tuple[int, ...] | None = _option("levels for the anomaly map (default: tuned)", kind="levels")
    score_map_levels: tuple[int, ...] | None = _option(
        "map and combined image scores: levels of the map whose top 1% is the score's map part (default: "
        "the backbone's; the paper's 3-7 for EfficientNets, deeper than the anomaly map's)",
        kind="levels",
    )
    position_levels: tuple[int, ...] | None = _option(
        "hybrid localization: levels stacked for the per-position Gaussian (default: tuned)", kind="levels"
    )
    reduction: str = _option("opca keeps the smallest components, pca the largest", "opca", REDUCTIONS)
    variance: float = _option("share of variance the reduction keeps (opca 0.05, pca 0.95)", 0.05)
    localization: str = _option(
        "anomaly map: hybrid, shared or per-position Gaussians; auto chooses hybrid or shared at fit time",
        "auto",
        LOCALIZATIONS,
    )
    mixture_clusters: int = _option(
        "hybrid localization: Gaussians per map level in the shared half, one per k-means cluster of the "
        "training patches; 1 = one Gaussian (paper)",
        8,
    )
    image_size: int | tuple[int, int] | None = _option(
        "model input: a square side such as 448, or height x width such as 320x800; images are resized to "
        "it (default: the backbone's native size)",
        kind="size",
    )
    crop: str = _option(
        "part: cut each image to a window around its part before resizing it, sized from the training "
        "images' parts where they lie on a background and leave room; none: the whole image",
        "part",
        CROPS,
    )
    blur_sigma: float = _option("map blur in input pixels; 0 = off", 2.0)
    image_grid: int = _option(
        "image score: features averaged per cell of an N x N grid; 1 = global (paper)", 4
    )
    image_score: str = _option(
        "image score: pooled features, the map's top 1%, their combination, or auto (chosen at fit time)",
        "combined",
        IMAGE_SCORES,
    )
    global_levels: tuple[int, ...] | None = _option(
        "combined image score: levels pooled over the whole image, its third part; none for two parts "
        "(default: the backbone's; the paper's 3-7 for EfficientNets)",
        kind="levels or none",
    )
    precision: str = _option("bf16 runs the backbone under bfloat16 autocast", "fp32", PRECISIONS)
    folds: int = _option("folds of the training images for label-free thresholds; 0 = none", 5)
    max_false_alarm_rate: float = _option(
        "target share of good images flagged by label-free thresholds", 0.01
    )

    def __post_init__(self) -> None:
        for name in ("levels", "map_levels", "score_map_levels", "position_levels"):
            object.__setattr__(self, name, _levels(name, getattr(self, name)))
        if self.global_levels is not None:  # empty: no global part
            object.__setattr__(self, "global_levels", _levels("global_levels", self.global_levels) or ())
        if self.weights is not None:
            if not isinstance(self.weights, (str, os.PathLike)):
                raise GaussADError(f"--weights {self.weights!r}: expected a file path")
            object.__setattr__(self, "weights", str(Path(os.fspath(self.weights)).absolute()))
        for name in ("reduction", "localization", "precision", "image_score", "crop"):
            allowed = _metadata(name)["choices"]
            if getattr(self, name) not in allowed:
                raise GaussADError(
                    f"{_flag(name)} {getattr(self, name)!r}: expected one of {', '.join(allowed)}"
                )
        if not isinstance(self.backbone, str) or not self.backbone:
            raise GaussADError(f"--backbone {self.backbone!r}: expected a model name")
        _check_number("variance", self.variance, low=0.0, high=1.0, low_open=True)
        _check_number("blur_sigma", self.blur_sigma, low=0.0)
        _check_number(
            "max_false_alarm_rate",
            self.max_false_alarm_rate,
            low=0.0,
            high=1.0,
            low_open=True,
            high_open=True,
        )
        _check_whole("image_grid", self.image_grid, low=1)
        _check_whole("mixture_clusters", self.mixture_clusters, low=1)
        _check_whole("folds", self.folds, low=0)
        if self.folds == 1:
            raise GaussADError("--folds 1: expected 0 (no calibration) or at least 2")
        if self.image_size is not None:
            object.__setattr__(self, "image_size", _image_size(self.image_size))
        if self.position_levels and self.localization not in ("hybrid", "auto"):
            raise GaussADError(
                f"--position-levels apply to the hybrid localization only, not to {self.localization!r}"
            )

    def resolve_levels(self, backbone: Any) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """The image, map and position levels with `backbone` (a `TappedBackbone`): as given, else the
        backbone's defaults; no position levels unless the localization is hybrid (or auto, which may
        choose it). Raises on levels the backbone does not have."""
        levels = self.levels or tuple(backbone.default_levels)
        map_levels = self.map_levels or tuple(backbone.default_map_levels)
        position_levels: tuple[int, ...] = ()
        if self.localization in ("hybrid", "auto"):
            position_levels = self.position_levels or tuple(backbone.default_position_levels)
        chosen = {"levels": levels, "map levels": map_levels, "position levels": position_levels}
        _check_levels(backbone, chosen)
        return tuple(sorted(set(levels))), tuple(sorted(set(map_levels))), tuple(sorted(set(position_levels)))

    def resolve_global_levels(self, backbone: Any) -> tuple[int, ...]:
        """The levels pooled over the whole image for the combined score's third part (and auto's
        "global" candidate): as given (none: no such part), else the backbone's default. Raises on levels
        the backbone does not have."""
        levels = tuple(backbone.default_global_levels) if self.global_levels is None else self.global_levels
        _check_levels(backbone, {"global levels": levels})
        return levels

    def resolve_score_map_levels(self, backbone: Any) -> tuple[int, ...]:
        """The levels of the map whose top share is the image score's map part: as given, else the
        backbone's default. Raises on levels the backbone does not have."""
        levels = self.score_map_levels or tuple(backbone.default_score_map_levels)
        _check_levels(backbone, {"score map levels": levels})
        return tuple(sorted(set(levels)))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples as lists."""
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "configuration") -> ModelConfig:
        """A config from saved or given values; an unknown key is an error naming it."""
        if not isinstance(values, dict):
            raise GaussADError(f"{where}: model parameters must be an object, got {type(values).__name__}")
        unknown = sorted(set(values) - set(MODEL_OPTIONS))
        if unknown:
            raise GaussADError(f"{where}: unknown model parameters {', '.join(unknown)}")
        return cls(**values)


def _check_levels(backbone: Any, chosen: dict[str, Sequence[int]]) -> None:
    """Raise, naming the option, on any chosen levels that `backbone` does not have."""
    valid = sorted(info["level"] for info in backbone.feature_info)
    for name, values in chosen.items():
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise GaussADError(f"{name} {unknown} do not exist in {backbone.name}: valid levels are {valid}")


def _metadata(name: str) -> dict[str, Any]:
    return next(f.metadata for f in fields(ModelConfig) if f.name == name)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _levels(name: str, value: Sequence[int] | None) -> tuple[int, ...] | None:
    """Levels as a sorted tuple without repeats; None or empty for the backbone's default."""
    if value is None or (isinstance(value, (tuple, list)) and not value):
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise GaussADError(f"{_flag(name)} {value!r}: expected level numbers such as 3,4,5")
    if not all(isinstance(level, int) and not isinstance(level, bool) and level >= 0 for level in value):
        raise GaussADError(f"{_flag(name)} {list(value)!r}: levels are whole numbers, 0 or more")
    return tuple(sorted(set(value)))


def _image_size(value: Any) -> ImageSize:
    """A square side as an int, (height, width) as a tuple; a pair of equal sides becomes the side, so that
    a square input is stated one way only."""
    size = checked_image_size(value)
    if size is None:
        pair = isinstance(value, (tuple, list)) and len(value) == 2
        shown = "x".join(map(str, value)) if pair else repr(value)
        raise GaussADError(
            f"--image-size {shown}: expected a side such as 448 or height x width such as 320x800, "
            f"each from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}"
        )
    return size


def checked_image_size(value: Any) -> ImageSize | None:
    """An input size as given (a side, or a height-width pair as tuple or list) in its one form: the side
    for a square, else (height, width); None if it is not whole sides within the limits. The options, the
    model files and the exported files all read sizes through it."""
    pair = isinstance(value, (tuple, list)) and len(value) == 2
    sides = list(value) if pair else [value]
    if not all(_is_whole(side) and MIN_IMAGE_SIZE <= side <= MAX_IMAGE_SIZE for side in sides):
        return None
    return sides[0] if len(set(sides)) == 1 else (sides[0], sides[1])


def level_union(*level_sets: Iterable[int]) -> tuple[int, ...]:
    """Every level of the sets, once, in order: what the backbone must produce for all of them."""
    return tuple(sorted(set().union(*level_sets)))


def size_pair(image_size: ImageSize) -> tuple[int, int]:
    """(height, width) of a model input given as a square side or as (height, width)."""
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def describe_size(image_size: ImageSize) -> str:
    """An input size as messages and reports show it: "224 px", or "320 x 800 px (height x width)"."""
    height, width = size_pair(image_size)
    return f"{height} px" if height == width else f"{height} x {width} px (height x width)"


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(
    name: str,
    value: Any,
    low: float,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high)
        )
    if not ok:
        bounds = (
            ("(" if low_open else "[")
            + f"{low:g}, "
            + ("inf)" if high is None else f"{high:g}" + (")" if high_open else "]"))
        )
        raise GaussADError(f"{_flag(name)} {value!r}: expected a number in {bounds}")


def _check_whole(name: str, value: Any, low: int) -> None:
    if not _is_whole(value) or value < low:
        raise GaussADError(f"{_flag(name)} {value!r}: expected a whole number {low} or more")


DEFAULTS = ModelConfig()
MODEL_OPTIONS: dict[str, dict[str, Any]] = {
    f.name: {**f.metadata, "default": f.default} for f in fields(ModelConfig)
}
