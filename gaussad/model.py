"""GaussAD: the detector as a scikit-learn style estimator.

Fit on good images: one Gaussian per level over globally pooled features (image score) and one per level
over positional features (anomaly map), each on reduced features (OPCA by default) with Ledoit-Wolf
shrinkage. Score: the sum over levels of pooled Mahalanobis distances. Map: the mean over map levels of
positional distances, upsampled, optionally blurred, at each image's own size; the default "hybrid"
localization takes its geometric mean with the map of one Gaussian per position over stacked levels.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from gaussad.accumulate import LevelAccumulator
from gaussad.backbones import TappedBackbone, load_backbone
from gaussad.calibration import Threshold, check_rate, quantile_threshold
from gaussad.errors import GaussADError
from gaussad.features import FeatureExtractor, Precision, pool_features, resolve_device, stack_levels
from gaussad.gaussian import Gaussian, Reduction, component_distance, fit_gaussian
from gaussad.images import ImageInput, collect_images, describe
from gaussad.maps import combine_maps, level_distance_map, resize_map
from gaussad.options import (
    DEFAULT_BACKBONE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_BLUR_SIGMA,
    DEFAULT_FALSE_ALARM_RATE,
    DEFAULT_FOLDS,
    DEFAULT_IMAGE_GRID,
    DEFAULT_LOCALIZATION,
    DEFAULT_PRECISION,
    DEFAULT_REDUCTION,
    DEFAULT_VARIANCE,
    DEFAULT_WORKERS,
    LOCALIZATIONS,
    PRECISIONS,
    REDUCTIONS,
)

# The hybrid map's per-position Gaussian keeps all stacked features, as PaDiM does: reduced to the OPCA
# components, one Gaussian per position maps the tiles' defects worse than the shared ones (README).
POSITION_REDUCTION: tuple[Reduction, float] = ("none", 1.0)


@dataclass
class Prediction:
    """Image scores and anomaly maps (each at its image's original size, float32), in input order."""

    names: list[str]
    scores: np.ndarray
    maps: list[np.ndarray]


@dataclass
class LevelOutputs:
    """One batch of per-level results, on the model's device."""

    start: int  # index of the batch's first image
    names: list[str]
    sizes: list[tuple[int, int]]  # original (height, width) of each image
    distances: torch.Tensor  # (B, len(levels_)): per-component distance of grid-pooled features per level
    level_maps: list[torch.Tensor]  # per map level: (B, h, w) distances on that level's grid
    position_map: torch.Tensor | None  # hybrid localization: (B, h, w) per-position distances, else None


class GaussAD:
    """Anomaly detector fitted on defect-free images.

    Parameters are stored as given (scikit-learn convention); what `fit` learns ends in `_`.
    levels default to the backbone's paper levels, map_levels to the backbone's measured map levels,
    position_levels (hybrid localization only) to its measured levels for the per-position Gaussian,
    image_size to its native input size. `folds` > 1 also learns label-free thresholds (calibration.py).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: str | os.PathLike | None = None,
        levels: Sequence[int] | None = None,
        map_levels: Sequence[int] | None = None,
        position_levels: Sequence[int] | None = None,
        reduction: Reduction = DEFAULT_REDUCTION,
        variance: float = DEFAULT_VARIANCE,
        localization: str = DEFAULT_LOCALIZATION,
        image_size: int | None = None,
        blur_sigma: float = DEFAULT_BLUR_SIGMA,
        image_grid: int = DEFAULT_IMAGE_GRID,
        precision: Precision = DEFAULT_PRECISION,
        batch_size: int = DEFAULT_BATCH_SIZE,
        folds: int = DEFAULT_FOLDS,
        max_false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
        device: str = "auto",
        workers: int = DEFAULT_WORKERS,
        progress: bool = False,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.levels = levels
        self.map_levels = map_levels
        self.position_levels = position_levels
        self.reduction = reduction
        self.variance = variance
        self.localization = localization
        self.image_size = image_size
        self.blur_sigma = blur_sigma
        self.image_grid = image_grid
        self.precision = precision
        self.folds = folds
        self.max_false_alarm_rate = max_false_alarm_rate
        self.batch_size = batch_size
        self.device = device
        self.workers = workers
        self.progress = progress

    # ----------------------------------------------------------------------------------------- fitting
    def _check_params(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise GaussADError(f"reduction {self.reduction!r}: expected one of {', '.join(REDUCTIONS)}")
        if self.localization not in LOCALIZATIONS:
            raise GaussADError(
                f"localization {self.localization!r}: expected one of {', '.join(LOCALIZATIONS)}"
            )
        if self.precision not in PRECISIONS:
            raise GaussADError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        check_rate(self.max_false_alarm_rate)
        if self.blur_sigma < 0:
            raise GaussADError(f"blur sigma {self.blur_sigma}: expected 0 (off) or more")
        if not isinstance(self.image_grid, int) or self.image_grid < 1:
            raise GaussADError(f"image grid {self.image_grid!r}: expected a whole number of cells, 1 or more")
        if self.image_size is not None and self.image_size < 32:
            raise GaussADError(f"image size {self.image_size}: expected at least 32 pixels")

    def resolve_levels(self, backbone: TappedBackbone) -> tuple[tuple[int, ...], ...]:
        """The image, map and position levels this model uses with `backbone`, before any fit: as given,
        else the backbone's defaults; no position levels unless the localization is hybrid. Raises on
        levels the backbone does not have."""
        valid = {info["level"] for info in backbone.feature_info}
        levels = tuple(self.levels) if self.levels else backbone.default_levels
        map_levels = tuple(self.map_levels) if self.map_levels else backbone.default_map_levels
        if self.localization != "hybrid":
            if self.position_levels:
                raise GaussADError(
                    f"position levels apply to the hybrid localization only, not to {self.localization!r}"
                )
            position_levels: tuple[int, ...] = ()
        else:
            position_levels = tuple(self.position_levels or backbone.default_position_levels)
        for name, chosen in (
            ("levels", levels),
            ("map levels", map_levels),
            ("position levels", position_levels),
        ):
            unknown = sorted(set(chosen) - valid)
            if unknown:
                raise GaussADError(
                    f"{name} {unknown} do not exist in {backbone.name}: valid levels are {sorted(valid)}"
                )
        return tuple(sorted(set(levels))), tuple(sorted(set(map_levels))), tuple(sorted(set(position_levels)))

    def fit(self, images: ImageInput | Iterable[ImageInput]) -> GaussAD:
        """Learn the Gaussians from defect-free images (paths, folders, PIL images, arrays, tensors)."""
        self._check_params()
        items = collect_images(images)
        if len(items) < 2:
            raise GaussADError(f"need at least 2 training images, got {len(items)}")
        started = time.perf_counter()
        self.device_ = resolve_device(self.device)
        self.backbone_ = load_backbone(self.backbone, self.weights)
        self.levels_, self.map_levels_, self.position_levels_ = self.resolve_levels(self.backbone_)
        self.image_size_ = int(self.image_size or self.backbone_.preprocessing.image_size)
        extractor = self._extractor()
        n_folds = self._n_folds(len(items))
        # Contiguous folds (as scikit-learn's KFold): a batch then spans one or two folds, and per-position
        # sums take one in-place product per fold present (tiles, cProfile: 1.5 s -> 0.8 s in add).
        fold_of = np.arange(len(items)) * max(n_folds, 1) // len(items)
        pooled: dict[int, list[np.ndarray]] = {level: [] for level in self.levels_}
        with tempfile.TemporaryDirectory(prefix="gaussad-fit-") as spill_dir:
            accumulators = {
                level: LevelAccumulator(
                    Path(spill_dir) / f"level{level}.f32",
                    self.localization == "per-position",
                    max(n_folds, 1),
                )
                for level in self.map_levels_
            }
            position_accumulator = (
                LevelAccumulator(Path(spill_dir) / "position.f32", True, max(n_folds, 1))
                if self.position_levels_
                else None
            )
            for batch in extractor.batches(items, progress="fit" if self.progress else None):
                batch_folds = fold_of[batch.start : batch.start + len(batch.sizes)].tolist()
                by_level = dict(zip(extractor.levels, batch.features, strict=True))
                for level in self.levels_:
                    pooled[level].append(
                        pool_features(by_level[level], self.image_grid).to("cpu", torch.float64).numpy()
                    )
                for level, accumulator in accumulators.items():
                    accumulator.add(by_level[level], batch_folds)
                if position_accumulator is not None:
                    position_accumulator.add(self._position_features(by_level), batch_folds)
            pooled_all = {level: np.concatenate(parts) for level, parts in pooled.items()}
            # Small dense linear algebra runs faster on one BLAS thread, and several times faster when
            # another process shares the cores (measured: eigh of 320 x 320, 35 ms against 144 ms). The
            # Gaussians are independent of each other: two at a time, one per core (tiles, statistics and
            # calibration: 6.5 -> 5.3 s).
            with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=2) as pool:
                folds = [None, *range(n_folds)]
                finish = {"release": True, "fold_dtype": np.float32}  # fold models only score held-out images
                # Longest first: the per-position Gaussians, then the fold models' image scores. Each level's
                # map Gaussians, the full model's and each fold model's, take one read of its spill.
                position_job = (
                    pool.submit(position_accumulator.finish_many, *POSITION_REDUCTION, folds, **finish)
                    if position_accumulator is not None
                    else None
                )
                scores_job = pool.submit(self._held_out_scores, pooled_all, fold_of, n_folds)
                map_jobs = [
                    pool.submit(
                        accumulators[level].finish_many, self.reduction, self.variance, folds, **finish
                    )
                    for level in self.map_levels_
                ]
                image_jobs = [
                    pool.submit(fit_gaussian, pooled_all[level], self.reduction, self.variance)
                    for level in self.levels_
                ]
                self.image_gaussians_ = [job.result() for job in image_jobs]
                map_fits = [job.result() for job in map_jobs]
                self.map_gaussians_ = [fits[0] for fits in map_fits]
                position_fits = position_job.result() if position_job is not None else None
                self.position_gaussian_ = position_fits[0] if position_fits else None
                self.held_out_scores_ = scores_job.result()
                self.held_out_map_maxima_, self.held_out_map_medians_ = self._held_out_maps(
                    accumulators,
                    [fits[1:] for fits in map_fits],
                    (position_accumulator, position_fits[1:]) if position_fits else None,
                    fold_of,
                    n_folds,
                )
        self.image_threshold_, self.pixel_threshold_ = self.label_free_thresholds()
        self.n_train_ = len(items)
        self.fit_seconds_ = time.perf_counter() - started
        self._on_device = None
        return self

    # ------------------------------------------------------------------------------------- calibration
    def _n_folds(self, n_images: int) -> int:
        """Folds for label-free calibration: 0 turns it off; each fold's model needs 2 or more images."""
        if self.folds == 0:
            return 0
        if self.folds < 2:
            raise GaussADError(f"folds {self.folds}: expected 0 (no calibration) or at least 2")
        return min(self.folds, n_images) if n_images >= 3 else 0

    def _held_out_scores(
        self, pooled: dict[int, np.ndarray], fold_of: np.ndarray, n_folds: int
    ) -> np.ndarray:
        """Each training image's score under image Gaussians fitted without its fold (label-free
        calibration), from the pooled features kept from the fit; none without calibration."""
        scores = np.zeros(len(fold_of) if n_folds else 0)
        for fold in range(n_folds):
            held = fold_of == fold
            for level in self.levels_:
                gaussian = fit_gaussian(pooled[level][~held], self.reduction, self.variance)
                scores[held] += gaussian.component_distances(pooled[level][held])
        return scores

    def _held_out_maps(
        self,
        accumulators: dict[int, LevelAccumulator],
        fold_map_gaussians: list[list[Gaussian]],
        fold_position: tuple[LevelAccumulator, list[Gaussian]] | None,
        fold_of: np.ndarray,
        n_folds: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The maximum and median of each training image's anomaly map under map Gaussians fitted without
        its fold. Uses the features kept from the fit: no backbone pass. fold_map_gaussians[i][fold] is map
        level i's Gaussian fitted without that fold; fold_position the position accumulator and its fold
        Gaussians (hybrid localization). None without calibration."""
        n_images = len(fold_of) if n_folds else 0
        maxima, medians = np.zeros(n_images), np.zeros(n_images)
        for fold in range(n_folds):
            # Every map input with its fold Gaussian: (features (n, C, H, W), mean, whitening).
            inputs = [
                (accumulators[level].read_fold(fold), *fold_gaussians[fold].to_torch(self.device_))
                for level, fold_gaussians in zip(self.map_levels_, fold_map_gaussians, strict=True)
            ]
            if fold_position is not None:
                accumulator, fold_gaussians = fold_position
                inputs.append((accumulator.read_fold(fold), *fold_gaussians[fold].to_torch(self.device_)))
            # Maps a batch at a time: a whole fold's full-size maps would raise the peak memory of the fit.
            rows = np.flatnonzero(fold_of == fold)
            for start in range(0, len(rows), self.batch_size):
                part = slice(start, start + self.batch_size)
                maps = [level_distance_map(f[part].to(self.device_), m, w) for f, m, w in inputs]
                position_map = maps.pop() if fold_position is not None else None
                combined = self._combine_maps(maps, position_map).flatten(1)
                maxima[rows[part]] = combined.amax(dim=1).cpu().numpy()
                medians[rows[part]] = combined.median(dim=1).values.cpu().numpy()
        return maxima, medians

    def label_free_thresholds(self) -> tuple[Threshold | None, Threshold | None]:
        """Thresholds for `max_false_alarm_rate` from the held-out normal results (None without them)."""
        if not len(self.held_out_scores_):
            return None, None
        rate = self.max_false_alarm_rate
        check_rate(rate)
        n_images = len(self.held_out_scores_)
        where = f"{n_images} good training images, {self._n_folds(n_images)}-fold held out"
        image = quantile_threshold(
            self.held_out_scores_, rate, "label-free", f"{1 - rate:.4g} quantile of image scores of {where}"
        )
        pixel = quantile_threshold(
            self.held_out_map_maxima_, rate, "label-free", f"{1 - rate:.4g} quantile of map maxima of {where}"
        )
        pixel.normal_level = float(np.median(self.held_out_map_medians_))
        return image, pixel

    # ----------------------------------------------------------------------------------------- scoring
    def _check_fitted(self) -> None:
        if not hasattr(self, "image_gaussians_"):
            raise GaussADError("this GaussAD model is not fitted yet: call fit() or GaussAD.load()")

    @property
    def extracted_levels(self) -> list[int]:
        """Every level the backbone produces for this model: image, map and position levels."""
        return sorted({*self.levels_, *self.map_levels_, *self.position_levels_})

    def _extractor(self) -> FeatureExtractor:
        return FeatureExtractor(
            self.backbone_,
            self.extracted_levels,
            self.image_size_,
            self.device_,
            precision=self.precision,
            batch_size=self.batch_size,
            workers=self.workers,
        )

    def _device_gaussians(self) -> tuple[list, list, tuple | None]:
        """The Gaussians (image, map, position) as float32 tensors on the model's device, converted once."""
        if getattr(self, "_on_device", None) is None:
            position = self.position_gaussian_
            self._on_device = (
                [gaussian.to_torch(self.device_) for gaussian in self.image_gaussians_],
                [gaussian.to_torch(self.device_) for gaussian in self.map_gaussians_],
                position.to_torch(self.device_) if position is not None else None,
            )
        return self._on_device

    def _position_features(self, by_level: dict[int, torch.Tensor]) -> torch.Tensor:
        return stack_levels([by_level[level] for level in self.position_levels_])

    def _combine_maps(
        self, level_maps: list[torch.Tensor], position_map: torch.Tensor | None
    ) -> torch.Tensor:
        """The anomaly maps (B, S, S) at the model input size, from the per-level (and position) maps."""
        return combine_maps(level_maps, position_map, self.image_size_, self.blur_sigma)

    def iter_levels(
        self, images: ImageInput | Iterable[ImageInput], with_maps: bool = True
    ) -> Iterator[LevelOutputs]:
        """Per-level results batch by batch: pooled distances per image-score level and distance maps on
        each map level's own grid. The building block of `iter_predict`, and of ablations over levels."""
        self._check_fitted()
        items = collect_images(images)
        image_gaussians, map_gaussians, position_gaussian = self._device_gaussians()
        extractor = self._extractor()
        for batch in extractor.batches(items, progress="predict" if self.progress else None):
            by_level = dict(zip(extractor.levels, batch.features, strict=True))
            distances = torch.stack(
                [
                    component_distance(pool_features(by_level[level], self.image_grid), *gaussian)
                    for level, gaussian in zip(self.levels_, image_gaussians, strict=True)
                ],
                dim=1,
            )
            level_maps, position_map = [], None
            if with_maps:
                level_maps = [
                    level_distance_map(by_level[level], *gaussian)
                    for level, gaussian in zip(self.map_levels_, map_gaussians, strict=True)
                ]
                if position_gaussian is not None:
                    position_map = level_distance_map(self._position_features(by_level), *position_gaussian)
            stop = batch.start + len(distances)
            names = [describe(items[index], index) for index in range(batch.start, stop)]
            yield LevelOutputs(batch.start, names, batch.sizes, distances, level_maps, position_map)

    def level_results(
        self, images: ImageInput | Iterable[ImageInput]
    ) -> tuple[np.ndarray, list[torch.Tensor], torch.Tensor | None]:
        """Per-level results of all images on the CPU: pooled distances (N, len(levels_)), per map level
        distance maps (N, h, w) on that level's grid, and the position maps (N, h, w) of a hybrid model
        (else None). For ablations over levels and blurs."""
        distances, level_maps, position_maps = [], [[] for _ in self.map_levels_], []
        for outputs in self.iter_levels(images):
            distances.append(outputs.distances.cpu())
            for store, level_map in zip(level_maps, outputs.level_maps, strict=True):
                store.append(level_map.cpu())
            if outputs.position_map is not None:
                position_maps.append(outputs.position_map.cpu())
        return (
            torch.cat(distances).numpy(),
            [torch.cat(store) for store in level_maps],
            torch.cat(position_maps) if position_maps else None,
        )

    def iter_predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        with_maps: bool = True,
        map_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> Iterator[tuple[list[str], np.ndarray, list[np.ndarray]]]:
        """Predictions batch by batch: (names, scores, maps). Streams, so any number of images fits in memory.

        map_sizes gives each image's output map size (default: the image's own size).
        """
        for outputs in self.iter_levels(images, with_maps):
            scores = outputs.distances.sum(dim=1).cpu().numpy().astype(np.float64)
            maps: list[np.ndarray] = []
            if with_maps:
                combined = self._combine_maps(outputs.level_maps, outputs.position_map)
                start, stop = outputs.start, outputs.start + len(scores)
                sizes = outputs.sizes if map_sizes is None else map_sizes[start:stop]
                maps = [resize_map(m, size).cpu().numpy() for m, size in zip(combined, sizes, strict=True)]
            yield outputs.names, scores, maps

    def predict(self, images: ImageInput | Iterable[ImageInput]) -> Prediction:
        """Scores and anomaly maps of all images."""
        names: list[str] = []
        scores: list[np.ndarray] = []
        maps: list[np.ndarray] = []
        for batch_names, batch_scores, batch_maps in self.iter_predict(images):
            names += batch_names
            scores.append(batch_scores)
            maps += batch_maps
        return Prediction(names, np.concatenate(scores), maps)

    def score(self, images: ImageInput | Iterable[ImageInput]) -> np.ndarray:
        """Image anomaly scores only (no maps: faster)."""
        return np.concatenate([scores for _, scores, _ in self.iter_predict(images, with_maps=False)])

    # ------------------------------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the fitted model to a folder (JSON config + safetensors), atomically."""
        from gaussad.persistence import save_model

        self._check_fitted()
        return save_model(self, Path(directory))

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "auto", **overrides) -> GaussAD:
        """Read a model saved by `save`; `overrides` change run-time settings such as batch_size."""
        from gaussad.persistence import load_model

        return load_model(cls, Path(directory), device=device, **overrides)

    def describe_levels(self) -> list[dict]:
        """Per-Gaussian facts for reports: level, role, components kept, shrinkage."""
        self._check_fitted()
        rows = []
        for role, levels, gaussians in (
            ("image", self.levels_, self.image_gaussians_),
            ("map", self.map_levels_, self.map_gaussians_),
        ):
            for level, gaussian in zip(levels, gaussians, strict=True):
                rows.append(_level_row(role, level, gaussian))
        if self.position_gaussian_ is not None:
            rows.append(
                _level_row("position", "+".join(map(str, self.position_levels_)), self.position_gaussian_)
            )
        return rows


def _level_row(role: str, level: int | str, gaussian: Gaussian) -> dict:
    return {
        "role": role,
        "level": level,
        "channels": int(gaussian.whitening.shape[-2]),
        "components": gaussian.n_components,
        "shrinkage": float(np.mean(gaussian.shrinkage)),
    }
