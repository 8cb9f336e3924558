"""What fitting learns, in one dataclass that converts to and from named arrays and JSON metadata.

`FittedState` is the model's learned state: the levels and input size it used, every Gaussian, the held-out
normal results of label-free calibration, the thresholds, and the backbone it was fitted with. A model
folder stores `to_tensors()` (safetensors) and its metadata (JSON); `from_tensors` rebuilds it. Nothing here
knows of `GaussAD`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from gaussad.calibration import Threshold, far_out
from gaussad.config import IMAGE_SCORES, ImageSize, checked_image_size, level_union, size_pair
from gaussad.errors import GaussADError
from gaussad.framing import Crop
from gaussad.gaussian import Gaussian
from gaussad.mixture import GaussianMixture

POSITION_KEY = "position"
HELD_OUT = ("held_out_scores", "held_out_map_maxima", "held_out_map_medians")


@dataclass(frozen=True)
class BackboneInfo:
    """The backbone a model was fitted with: its name and the checksum of its weights."""

    name: str
    weights_source: str  # a package name, "file", or "timm" (downloaded by timm)
    weights_path: str | None
    weights_sha256: str | None


@dataclass
class FittedState:
    """Everything `GaussAD.fit` learns. Gaussians are in float64; thresholds may be changed later
    (`gaussad calibrate`), the rest only by fitting again."""

    backbone: BackboneInfo
    levels: tuple[int, ...]
    map_levels: tuple[int, ...]
    position_levels: tuple[int, ...]
    image_size: ImageSize  # a square input's side, or (height, width)
    n_train: int
    image_gaussians: list[Gaussian]
    map_gaussians: list[Gaussian]
    position_gaussian: Gaussian | None
    held_out_scores: np.ndarray = field(default_factory=lambda: np.empty(0))
    held_out_map_maxima: np.ndarray = field(default_factory=lambda: np.empty(0))
    held_out_map_medians: np.ndarray = field(default_factory=lambda: np.empty(0))
    image_threshold: Threshold | None = None
    pixel_threshold: Threshold | None = None
    image_score: str = "pooled"  # "pooled", "map" or "combined": as fitted, after any auto choice
    image_grid: int = 4  # cells per side of the pooled image features
    # "combined": the levels pooled over the whole image for its third part, and their Gaussians (none in
    # models saved before it had one).
    global_levels: tuple[int, ...] = ()
    global_gaussians: list[Gaussian] = field(default_factory=list)
    # "combined": the spreads (held-out standard deviations) of the pooled score, of the map's top share
    # and of the global score, which divide each before they are summed.
    score_scales: tuple[float, ...] = (1.0, 1.0)
    selection: dict[str, Any] | None = None  # the evidence of auto options: each candidate's proxy metrics
    # "map" and "combined": the levels of the map whose top share is the score's map part; () for the
    # anomaly map's own (models saved before it had levels of its own, and pooled scores).
    score_map_levels: tuple[int, ...] = ()
    # The window around each image's part, as shares of its height and width (`gaussad.framing`); None: the
    # whole image.
    crop: Crop | None = None

    @property
    def calibrated(self) -> np.ndarray:
        """Which training images' held-out results the label-free thresholds are quantiles of (bool per
        image): all but those whose image score lies far above the others' (`calibration.far_out`), likely
        defective."""
        return ~far_out(self.held_out_scores)

    @property
    def input_size(self) -> tuple[int, int]:
        """The model input's (height, width)."""
        return size_pair(self.image_size)

    @property
    def localization(self) -> str:
        """The maps as fitted, after any auto choice: "hybrid", "shared" or "per-position"."""
        if self.position_gaussian is not None:
            return "hybrid"
        return "per-position" if self.map_gaussians[0].whitening.ndim == 3 else "shared"

    @property
    def map_gaussian_levels(self) -> tuple[int, ...]:
        """The levels of `map_gaussians`: the anomaly map's and the score map's."""
        return level_union(self.map_levels, self.score_map_levels)

    @property
    def mixture_levels(self) -> tuple[int, ...]:
        """The levels of `map_gaussians` that are mixtures (the hybrid map's shared half)."""
        return tuple(
            level
            for level, gaussian in zip(self.map_gaussian_levels, self.map_gaussians, strict=True)
            if isinstance(gaussian, GaussianMixture)
        )

    @property
    def resolved_options(self) -> dict[str, Any]:
        """The model options that the fit resolved, as `ModelConfig` holds them: the levels of every part
        and the input size. A saved model's parameters must agree with them."""
        return {
            "levels": self.levels,
            "map_levels": self.map_levels,
            "score_map_levels": self.score_map_levels or None,
            "position_levels": self.position_levels or None,
            "image_size": self.image_size,
        }

    @property
    def extracted_levels(self) -> tuple[int, ...]:
        """Every level the backbone produces for this model: image, map and position levels."""
        return level_union(self.levels, self.map_gaussian_levels, self.position_levels, self.global_levels)

    def with_thresholds(self, image: Threshold | None, pixel: Threshold | None) -> FittedState:
        return replace(self, image_threshold=image, pixel_threshold=pixel)

    def _level_gaussians(self) -> list[tuple[str, int, Gaussian]]:
        """(role, level, Gaussian) of every per-level Gaussian: image, map and global."""
        return [
            (role, level, gaussian)
            for role, levels, gaussians in (
                ("image", self.levels, self.image_gaussians),
                ("map", self.map_gaussian_levels, self.map_gaussians),
                ("global", self.global_levels, self.global_gaussians),
            )
            for level, gaussian in zip(levels, gaussians, strict=True)
        ]

    def describe_levels(self) -> list[dict[str, Any]]:
        """Per-Gaussian facts for reports: level, role, channels, components kept, mean shrinkage."""
        rows = [_level_row(role, level, gaussian) for role, level, gaussian in self._level_gaussians()]
        if self.position_gaussian is not None:
            rows.append(
                _level_row("position", "+".join(map(str, self.position_levels)), self.position_gaussian)
            )
        return rows

    def _named_gaussians(self) -> list[tuple[str, Gaussian]]:
        named = [(f"{role}.{level}", gaussian) for role, level, gaussian in self._level_gaussians()]
        if self.position_gaussian is not None:
            named.append((POSITION_KEY, self.position_gaussian))
        return named

    def to_tensors(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(named float64 arrays, JSON-ready metadata): what a model folder stores."""
        tensors: dict[str, np.ndarray] = {}
        for key, gaussian in self._named_gaussians():
            tensors[f"{key}.mean"] = np.ascontiguousarray(gaussian.mean, dtype=np.float64)
            tensors[f"{key}.whitening"] = np.ascontiguousarray(gaussian.whitening, dtype=np.float64)
            tensors[f"{key}.shrinkage"] = np.atleast_1d(np.asarray(gaussian.shrinkage, dtype=np.float64))
        for name in HELD_OUT:
            tensors[name] = np.ascontiguousarray(getattr(self, name), dtype=np.float64)
        metadata = {
            "backbone": vars(self.backbone).copy(),
            "levels": list(self.levels),
            "map_levels": list(self.map_levels),
            "score_map_levels": list(self.score_map_levels),
            "position_levels": list(self.position_levels),
            "mixture_levels": list(self.mixture_levels),
            # A square input's side, as models saved before other inputs: their files stay the same.
            "image_size": self.image_size if isinstance(self.image_size, int) else list(self.image_size),
            "n_train": self.n_train,
            "image_score": self.image_score,
            "image_grid": self.image_grid,
            "global_levels": list(self.global_levels),
            "score_scales": list(self.score_scales),
            "crop": None if self.crop is None else self.crop.as_json(),
            "selection": self.selection,
            "gaussians": self.describe_levels(),
            "thresholds": {
                "image": self.image_threshold.as_dict() if self.image_threshold else None,
                "pixel": self.pixel_threshold.as_dict() if self.pixel_threshold else None,
            },
        }
        return tensors, metadata

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, np.ndarray], metadata: dict[str, Any], where: str
    ) -> FittedState:
        """Rebuild the state from `to_tensors`' output; anything missing or malformed is an error naming
        `where` (the model folder's files)."""

        def gaussian(key: str, mixture: bool = False) -> Gaussian:
            try:
                return (GaussianMixture if mixture else Gaussian)(
                    tensors[f"{key}.mean"], tensors[f"{key}.whitening"], tensors[f"{key}.shrinkage"]
                )
            except KeyError as missing:
                raise GaussADError(f"{where}: missing tensor {missing}") from None

        try:
            levels = _levels(metadata["levels"])
            map_levels = _levels(metadata["map_levels"])
            score_map_levels = _levels(metadata.get("score_map_levels", []), allow_empty=True)
            position_levels = _levels(metadata.get("position_levels", []), allow_empty=True)
            global_levels = _levels(metadata.get("global_levels", []), allow_empty=True)
            mixture_levels = _levels(metadata.get("mixture_levels", []), allow_empty=True)
            if not set(mixture_levels) <= set(map_levels) or (mixture_levels and not position_levels):
                raise ValueError(f"mixture levels {list(mixture_levels)} outside a hybrid map's levels")
            image_score = _choice(metadata.get("image_score", "pooled"), "image score", IMAGE_SCORES[:-1])
            parts = 3 if global_levels else 2
            if global_levels and image_score != "combined":
                raise ValueError(f"global levels {list(global_levels)} with image score {image_score!r}")
            thresholds = metadata.get("thresholds") or {}
            if not isinstance(thresholds, dict):
                raise ValueError(f"thresholds {thresholds!r} are not an object")
            return cls(
                backbone=_backbone(metadata["backbone"]),
                levels=levels,
                map_levels=map_levels,
                position_levels=position_levels,
                image_size=_image_size(metadata["image_size"]),
                n_train=_whole(metadata["n_train"], "training images", 2),
                image_gaussians=[gaussian(f"image.{level}") for level in levels],
                map_gaussians=[
                    gaussian(f"map.{level}", level in mixture_levels)
                    for level in level_union(map_levels, score_map_levels)
                ],
                position_gaussian=gaussian(POSITION_KEY) if position_levels else None,
                **{name: tensors.get(name, np.empty(0)) for name in HELD_OUT},
                image_threshold=_threshold(thresholds.get("image")),
                pixel_threshold=_threshold(thresholds.get("pixel")),
                image_score=image_score,
                # Models saved before the grid was part of the fitted description: the parameters' grid.
                image_grid=_whole(
                    metadata.get("image_grid", (metadata.get("params") or {}).get("image_grid", 4)),
                    "image grid",
                    1,
                ),
                global_levels=global_levels,
                global_gaussians=[gaussian(f"global.{level}") for level in global_levels],
                score_scales=_scales(metadata.get("score_scales", [1.0] * parts), parts),
                selection=_selection(metadata.get("selection")),
                score_map_levels=score_map_levels,
                crop=Crop.from_json(metadata.get("crop")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise GaussADError(
                f"{where}: malformed model description ({type(error).__name__}: {str(error)!r})"
            ) from None


def _levels(values: Any, allow_empty: bool = False) -> tuple[int, ...]:
    if not isinstance(values, list) or not all(_is_whole(v) and v >= 0 for v in values):
        raise ValueError(f"levels {values!r} are not a list of whole numbers")
    if not values and not allow_empty:
        raise ValueError("no levels")
    return tuple(values)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _whole(value: Any, what: str, low: int, high: int | None = None) -> int:
    if not _is_whole(value) or value < low or (high is not None and value > high):
        raise ValueError(f"{what} {value!r} out of range")
    return value


def _image_size(value: Any) -> ImageSize:
    """A saved input size: a square side, or [height, width] (equal sides become the side)."""
    size = checked_image_size(value)
    if size is None:
        raise ValueError(f"image size {value!r} out of range")
    return size


def _choice(value: Any, what: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(allowed)}")
    return value


def _scales(values: Any, parts: int) -> tuple[float, ...]:
    if (
        not isinstance(values, list)
        or len(values) != parts
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0
            for v in values
        )
    ):
        raise ValueError(f"score scales {values!r} are not {parts} positive numbers")
    return tuple(float(v) for v in values)


def _selection(values: Any) -> dict[str, Any] | None:
    if values is not None and not isinstance(values, dict):
        raise ValueError(f"selection {values!r} is not an object")
    return values


def _backbone(values: Any) -> BackboneInfo:
    if not isinstance(values, dict):
        raise ValueError(f"backbone {values!r} is not an object")
    info = BackboneInfo(**values)
    if not isinstance(info.name, str) or not isinstance(info.weights_source, str):
        raise ValueError("backbone name and weights source must be text")
    for optional in (info.weights_path, info.weights_sha256):
        if optional is not None and not isinstance(optional, str):
            raise ValueError("backbone weights path and checksum must be text")
    return info


def _threshold(values: Any) -> Threshold | None:
    if not values:
        return None
    if not isinstance(values, dict):
        raise ValueError(f"threshold {values!r} is not an object")
    threshold = Threshold(**values)
    numbers = (threshold.value, threshold.normal_level)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in numbers):
        raise ValueError(f"threshold values {numbers!r} are not finite numbers")
    if not isinstance(threshold.method, str) or not isinstance(threshold.source, str):
        raise ValueError("threshold method and source must be text")
    return threshold


def _level_row(role: str, level: int | str, gaussian: Gaussian) -> dict[str, Any]:
    row = {
        "role": role,
        "level": level,
        "channels": int(gaussian.whitening.shape[-2]),
        "components": gaussian.n_components,
        "shrinkage": float(np.mean(gaussian.shrinkage)),
    }
    if isinstance(gaussian, GaussianMixture):
        row["clusters"] = gaussian.n_clusters
    return row
