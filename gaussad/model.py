"""GaussAD: the detector as a scikit-learn style estimator.

Fit on good images: per level a Gaussian over reduced features (OPCA by default) with Ledoit-Wolf
shrinkage, for the image score's pooled features and for the maps' positions, and for hybrid maps one
Gaussian per position over stacked levels; the full model's and each held-out fold's, from one backbone
pass (`gaussad.fitpass`). The fold models calibrate the thresholds and, through `gaussad.choice`, make the
`auto` choices. Scoring runs through `gaussad.scorer.Scorer`; what the fit learns is one
`gaussad.state.FittedState`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from gaussad.accumulate import LevelAccumulator
from gaussad.backbones import load_backbone
from gaussad.calibration import Threshold, check_rate, quantile_threshold
from gaussad.choice import (
    FoldResults,
    choose_localization,
    finish_state,
    paste_synthetic_defects,
    synthetic_defect_features,
    synthetic_results,
)
from gaussad.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_WORKERS,
    DEFAULTS,
    FEATURE_STORES,
    MODEL_OPTIONS,
    ImageSize,
    ModelConfig,
    level_union,
    size_pair,
)
from gaussad.decoding import decoded_batches, decoding_pool
from gaussad.errors import GaussADError
from gaussad.features import BatchRunner, ImageError, resolve_device
from gaussad.fitpass import Extractor, FitPlan, run_pass
from gaussad.framing import Box, Crop, crop_ruled_out, learn_crop, map_in_image, part_box, parts_move
from gaussad.gaussian import Gaussian, Reduction
from gaussad.heldout import FoldHeads, HeldOutMaps, map_head
from gaussad.images import DEFAULT_MAX_PIXELS, ImageInput, collect_images, describe, load_pixels
from gaussad.maps import resized_array
from gaussad.mixture import GaussianMixture, PatchSample, fit_mixtures
from gaussad.pooled import PooledFeatures
from gaussad.pooled import fit_level as fit_pooled
from gaussad.rereading import Levels, Replayed, Stored
from gaussad.scorer import Grid, ImageHead, LevelFeatures, Scorer
from gaussad.scratch import scratch_folder
from gaussad.selection import (
    OPTIONS,
    synthetic_sample,
    weighed_kinds,
)
from gaussad.state import BackboneInfo, FittedState
from gaussad.store import open_store
from gaussad.tuning import one_blas_thread

# The hybrid map's per-position Gaussian keeps all stacked features, as PaDiM does: reduced to the OPCA
# components, one Gaussian per position maps the tiles' defects worse than the shared ones (docs/design.md).
POSITION_REDUCTION: tuple[Reduction, float] = ("none", 1.0)
# Why an option was decided by a rule where the training images' parts move about (kept with the evidence).
NO_GRID = "the parts found move about the frame, so a grid cell has no one piece of the part"
WITHOUT_GRID = "combined without the grid, the score map's top share and the whole frame's pooling"
MOVING_RULES = {
    "localization": "shared: the parts found move about the frame, so a feature has no one place",
    "image_score": f"{WITHOUT_GRID}: {NO_GRID}",
}
# Below this many training images the grid's Gaussians, which learn from one pooled vector per image and
# cell, detect worse than the combined score without them (docs/design.md, "With a few dozen training
# images"): the combined and auto image scores drop the grid, as where parts move about.
MIN_IMAGES_FOR_GRID = 150
RUNTIME_OPTIONS = ("device", "batch_size", "workers", "progress", "on_error", "max_pixels")
ENGINES = ("local", "ray")
# Where the fit runs and where it keeps features (run-time settings that only `fit` reads).
FIT_OPTIONS = ("engine", "address", "actors", "feature_store")
ON_ERRORS = ("stop", "skip")
# What auto options and the combined score take where there are no held-out folds.
AUTO_FALLBACK = ("pooled", "hybrid")
SPILL_PREFIX = "gaussad-fit-"
ImageT = TypeVar("ImageT")  # a training image as the caller gave it (a path, an array, ...)


@dataclass
class Prediction:
    """Image scores and anomaly maps (each at its image's original size, float32), in input order."""

    names: list[str]
    scores: np.ndarray
    maps: list[np.ndarray]


@dataclass
class PredictionBatch:
    """Predictions for consecutive images: what `GaussAD.iter_predict` yields."""

    indices: list[int]  # the images' positions among the inputs
    names: list[str]
    sizes: list[tuple[int, int]]  # each image's own (height, width), as decoded
    scores: np.ndarray  # float64
    maps: list[np.ndarray]  # float32, at the requested size or the image's own; empty without maps
    errors: list[ImageError]  # images of the batch that were skipped (on_error="skip")

    @property
    def start(self) -> int:
        """Position of the batch's first image among the inputs (-1 for a batch of errors only)."""
        return self.indices[0] if self.indices else -1


class GaussAD:
    """Anomaly detector fitted on defect-free images.

    Model parameters are the fields of `ModelConfig` (defaults and allowed values there), stored as given
    (scikit-learn convention); device, batch_size, workers, progress, on_error and the engine are run-time
    settings: on_error "stop" ends a run at the first unreadable image, "skip" leaves such images out
    (`fit` lists them in `skipped_`, `iter_predict` in each batch's `errors`); engine "ray" runs the fit's
    backbone pass on a Ray cluster (`address`, or a local one; `actors` workers), with the same result;
    feature_store says where the fit keeps the training features until its Gaussians are finished ("disk",
    "memory", or "none": the backbone runs over the images again instead; `gaussad.store`).
    What `fit` learns ends in `_`: `state_` holds all of it, and the properties below read it.
    """

    def __init__(
        self,
        backbone: str = DEFAULTS.backbone,
        weights: str | os.PathLike | None = DEFAULTS.weights,
        levels: Sequence[int] | None = DEFAULTS.levels,
        map_levels: Sequence[int] | None = DEFAULTS.map_levels,
        score_map_levels: Sequence[int] | None = DEFAULTS.score_map_levels,
        position_levels: Sequence[int] | None = DEFAULTS.position_levels,
        reduction: Reduction = DEFAULTS.reduction,
        variance: float = DEFAULTS.variance,
        localization: str = DEFAULTS.localization,
        mixture_clusters: int = DEFAULTS.mixture_clusters,
        image_size: ImageSize | None = DEFAULTS.image_size,
        crop: str = DEFAULTS.crop,
        blur_sigma: float = DEFAULTS.blur_sigma,
        image_grid: int = DEFAULTS.image_grid,
        image_score: str = DEFAULTS.image_score,
        global_levels: Sequence[int] | None = DEFAULTS.global_levels,
        precision: str = DEFAULTS.precision,
        folds: int = DEFAULTS.folds,
        max_false_alarm_rate: float = DEFAULTS.max_false_alarm_rate,
        device: str = "auto",
        batch_size: int = DEFAULT_BATCH_SIZE,
        workers: int = DEFAULT_WORKERS,
        progress: bool = False,
        on_error: str = "stop",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        engine: str = "local",
        address: str | None = None,
        actors: int | None = None,
        feature_store: str = "disk",
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.levels = levels
        self.map_levels = map_levels
        self.score_map_levels = score_map_levels
        self.position_levels = position_levels
        self.reduction = reduction
        self.variance = variance
        self.localization = localization
        self.mixture_clusters = mixture_clusters
        self.image_size = image_size
        self.crop = crop
        self.blur_sigma = blur_sigma
        self.image_grid = image_grid
        self.image_score = image_score
        self.global_levels = global_levels
        self.precision = precision
        self.folds = folds
        self.max_false_alarm_rate = max_false_alarm_rate
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.progress = progress
        self.on_error = on_error
        self.max_pixels = max_pixels
        self.engine = engine
        self.address = address
        self.actors = actors
        self.feature_store = feature_store

    @property
    def config(self) -> ModelConfig:
        """The model parameters, validated (a bad value is a `GaussADError` naming the option)."""
        return ModelConfig(**{name: getattr(self, name) for name in MODEL_OPTIONS})

    # ----------------------------------------------------------------------------------------- fitting
    def fit(self, images: ImageInput | Iterable[ImageInput]) -> GaussAD:
        """Learn the Gaussians from defect-free images (paths, folders, PIL images, arrays, tensors).

        With `auto` options, the choice is made here from the same images (`gaussad.selection`): the fit
        also scores synthetic defects pasted into held-out images, and `state_.selection` keeps the evidence.
        """
        config = self.config
        skip_errors = self._skip_errors()
        self._check_engine()
        items = collect_images(images)
        if len(items) < 2:
            raise GaussADError(f"need at least 2 training images, got {len(items)}")
        started = time.perf_counter()
        device = resolve_device(self.device)
        backbone = load_backbone(config.backbone, config.weights)
        image_size = config.image_size or backbone.preprocessing.image_size
        input_size = size_pair(image_size)
        n_folds = self._n_folds(len(items))
        # The levels given are checked before any pass, also those that a rule below replaces.
        config.resolve_levels(backbone)
        whole_frame = config.resolve_global_levels(backbone)
        # The window around the part, learnt before the pass that cuts every image to it.
        crop, moving = None, False
        if config.crop == "part":
            crop, moving = _part_crop(items, self.workers, self.max_pixels, skip_errors)
        config, fallback = _without_folds(config, n_folds)
        config, rules = _for_moving_parts(config, moving, whole_frame)
        config, rules = _for_few_images(config, rules, len(items), whole_frame)
        levels, map_levels, position_levels = config.resolve_levels(backbone)
        if "localization" in rules:
            position_levels = ()
        # The map part of a map or combined score reads a map of its own levels; the maps' Gaussians are
        # fitted for both.
        score_map_levels = config.resolve_score_map_levels(backbone) if config.image_score != "pooled" else ()
        gaussian_levels = level_union(map_levels, score_map_levels)
        auto_options = [option for option in OPTIONS if getattr(config, option) == "auto"]
        auto = bool(auto_options)
        scores_chosen = config.image_score == "auto"  # the image-score candidates weighed too
        # Pooled features, by name: (levels, grid). "global" (by default the paper's: stages 3-7 averaged
        # over the whole image) is the combined score's third part and an auto candidate of its own.
        pooled_sets = {"pooled": (levels, config.image_grid)}
        global_levels = config.resolve_global_levels(backbone)
        if config.image_score in ("combined", "auto") and global_levels:
            pooled_sets["global"] = (global_levels, 1)
        extracted = level_union(gaussian_levels, position_levels, *(lvs for lvs, _ in pooled_sets.values()))
        # Hybrid maps' shared half: a mixture per map level, fitted on a sample of the training patches.
        hybrid_weighed = bool(position_levels) and config.mixture_clusters > 1
        mixture_levels = map_levels if hybrid_weighed else ()
        extractor = Extractor(
            config.backbone,
            None if config.weights is None else os.path.abspath(config.weights),
            extracted,
            config.precision,
            input_size,
            str(device),
            self.batch_size,
            self.workers,
            self.max_pixels,
            crop,
        )
        runner = extractor.runner(backbone)
        features = runner.model
        plan = FitPlan(
            extracted,
            gaussian_levels,
            position_levels,
            pooled_sets,
            config.localization == "per-position",
            max(n_folds, 1),
            len(items),
            frozenset(synthetic_sample(len(items)).tolist()) if auto else frozenset(),
            stored=self.feature_store != "none",
            mixture_levels=mixture_levels,
            patches_per_image=PatchSample.for_images(len(items)).per_image,
        )
        # A disk store goes to the temporary folder (TMPDIR), in a folder a later run removes if this
        # process is killed. Without a store, the pooled features (15 kB per image) are kept in memory.
        kind = self.feature_store
        with (
            self._cluster(),  # one cluster for every pass of a Ray fit
            scratch_folder(SPILL_PREFIX) if kind == "disk" else nullcontext() as spill_dir,
        ):
            accumulators = {
                level: LevelAccumulator(
                    open_store(kind, spill_dir, f"level{level}"), plan.per_position_maps, plan.n_folds
                )
                for level in gaussian_levels
            }
            position_accumulator = (
                LevelAccumulator(open_store(kind, spill_dir, "position"), True, plan.n_folds)
                if position_levels
                else None
            )
            pooled_kind = "memory" if kind == "none" else kind
            pooled = {
                name: {
                    level: PooledFeatures(open_store(pooled_kind, spill_dir, f"{name}{level}"))
                    for level in lvs
                }
                for name, (lvs, _) in pooled_sets.items()
            }
            progress = "fit" if self.progress else None
            patch_samples = plan.patch_samples()
            if self.engine == "ray":
                from gaussad.cluster.fit import ray_pass

                passed = ray_pass(
                    plan,
                    extractor,
                    items,
                    accumulators,
                    position_accumulator,
                    pooled,
                    patch_samples,
                    self.address,
                    self.actors,
                    progress,
                    skip_errors,
                )
            else:
                passed = run_pass(
                    plan,
                    runner,
                    items,
                    accumulators,
                    position_accumulator,
                    pooled,
                    patch_samples,
                    0,
                    progress,
                    skip_errors,
                )
            kept, skipped, samples = passed.kept, passed.skipped, passed.samples
            pass_seconds = time.perf_counter() - started
            if len(kept) < 2:
                raise GaussADError(f"need at least 2 readable training images, got {len(kept)}")
            fold_of = plan.folds_of(kept)
            folds = [None, *range(n_folds)]
            finish = {"release": True, "fold_dtype": np.float32}  # fold models only score held-out images
            levels: Levels = dict(accumulators)
            if position_accumulator is not None:
                levels[None] = position_accumulator
            rereading = self._rereading(levels, plan, runner, extractor, items, kept, progress)
            # Each level's map Gaussians, the full model's and each fold model's, take one reading of every
            # image's features: its store's, or (without one) the backbone's again, for every level at once.
            reductions = {level: (config.reduction, config.variance) for level in gaussian_levels}
            finishers = rereading.finishers({**reductions, None: POSITION_REDUCTION}, folds, **finish)
            # The Gaussians are independent of each other: two at a time, one per core, longest first (the
            # per-position ones, then the image score's, each level's full and fold models together).
            with one_blas_thread(), ThreadPoolExecutor(max_workers=2) as pool:
                position_job = pool.submit(finishers[None]) if None in finishers else None
                # A job per level; fitted from sums (many images), a level holds a few dimension x dimension
                # matrices, and a candidate's levels then go in turn so as not to double the peak memory.
                image_jobs = {
                    name: [
                        pool.submit(
                            _fit_pooled_levels, group, fold_of, n_folds, config.reduction, config.variance
                        )
                        for group in _pooled_groups(pooled[name])
                    ]
                    for name in pooled_sets
                }
                map_jobs = [pool.submit(finishers[level]) for level in gaussian_levels]
                # Each mixture level's k-means and Gaussians (small matrices, a job per level), scaled to its
                # one Gaussian's components: queued after the map jobs, whose results they wait for.
                mixture_jobs = {
                    level: pool.submit(
                        _fit_mixture_level,
                        patch_samples[level],
                        map_jobs[gaussian_levels.index(level)],
                        config,
                        folds,
                    )
                    for level in mixture_levels
                }
                # The synthetic defects (seeded numpy) are made beside the Gaussians; their backbone pass
                # follows the pool.
                kinds = weighed_kinds(auto_options)
                pasted = pool.submit(paste_synthetic_defects, samples, kinds) if auto else None
                image_fits = {
                    name: [fit for job in jobs for fit in job.result()] for name, jobs in image_jobs.items()
                }
                map_fits = [job.result() for job in map_jobs]
                position_fits = position_job.result() if position_job is not None else None
                # By map level: the full model's mixture, then each fold model's.
                mixtures = {level: job.result() for level, job in mixture_jobs.items()}
            image_gaussians = {name: [full for full, _, _ in fits] for name, fits in image_fits.items()}
            # Per candidate: each training image's score under its fold's models, and those models
            # [fold][level] (label-free calibration).
            held_out = {
                name: (
                    sum((distances for _, _, distances in fits), np.zeros(len(fold_of) if n_folds else 0)),
                    [[fold_models[fold] for _, fold_models, _ in fits] for fold in range(n_folds)],
                )
                for name, fits in image_fits.items()
            }
            grids = features.grids(input_size)
            state = FittedState(
                backbone=BackboneInfo(
                    backbone.name, backbone.weights_source, backbone.weights_path, backbone.weights_sha256
                ),
                levels=levels,
                map_levels=map_levels,
                position_levels=position_levels,
                image_size=image_size,
                n_train=len(kept),
                image_gaussians=image_gaussians["pooled"],
                map_gaussians=[fits[0] for fits in map_fits],
                position_gaussian=position_fits[0] if position_fits else None,
                held_out_scores=held_out["pooled"][0],
                image_score=config.image_score,
                image_grid=config.image_grid,
                score_map_levels=score_map_levels,
                crop=crop,
            )
            # Auto weighs the paper's shared maps first: hybrid maps must beat them (`selection.choose`).
            localizations = ["shared", "hybrid"] if config.localization == "auto" else [config.localization]
            if "localization" in rules:
                localizations = ["shared"]
            synthetic = None
            if auto:
                # Only a chosen image score reads the pooled levels; the maps stop at their deepest level.
                weighed = (
                    features
                    if scores_chosen
                    else LevelFeatures(
                        features.backbone, level_union(gaussian_levels, position_levels), config.precision
                    )
                )
                synthetic = synthetic_defect_features(pasted.result(), runner, weighed)
            heads = FoldHeads(
                state,
                grids,
                self.blur_sigma,
                [fits[1:] for fits in map_fits],
                position_fits[1:] if position_fits else None,
                device,
                {
                    gaussian_levels.index(level): [fold.astype(np.float32) for fold in fits[1:]]
                    for level, fits in mixtures.items()
                },
            )
            weighed_scores = {name: (pooled_sets[name], held_out[name][1]) for name in pooled_sets}
            synthetic_maps, synthetic_tops, synthetic_pooled = synthetic_results(
                heads, state, localizations, weighed_scores if scores_chosen else {}, synthetic, n_folds
            )
            chosen, map_evidence = choose_localization(config, localizations, synthetic, synthetic_maps)
            folded = FoldResults(
                chosen,
                rereading.held_out(heads, chosen, fold_of) if n_folds else HeldOutMaps.empty(0),
                map_evidence,
                synthetic_tops,
                synthetic_pooled,
            )
        state = finish_state(
            state,
            config,
            folded,
            synthetic,
            held_out,
            image_gaussians,
            pooled_sets,
            {level: fits[0] for level, fits in mixtures.items()},
        )
        if fallback:
            state = replace(state, selection={"fallback": fallback})
        elif rules:
            selection = state.selection or {}
            chosen = {"localization": state.localization, "image_score": state.image_score}
            decided = {
                option: {**selection.get(option, {}), "chosen": chosen[option], "rule": rule}
                for option, rule in rules.items()
            }
            state = replace(state, selection=selection | decided)
        self.state_ = state.with_thresholds(
            *_label_free_thresholds(state, config.max_false_alarm_rate, n_folds)
        )
        self.backbone_ = backbone
        self.device_ = device
        if state.extracted_levels != extracted:  # an auto choice needs fewer levels than it weighed
            features = LevelFeatures(features.backbone, state.extracted_levels, config.precision)
        self.scorer_ = _build_scorer(features, state, grids, config).to(device)
        self.skipped_ = skipped
        self.fit_seconds_ = time.perf_counter() - started
        self.pass_seconds_ = pass_seconds  # of which the backbone's pass over the images (and the cluster's)
        return self

    # ------------------------------------------------------------------------------------- calibration
    def _n_folds(self, n_images: int) -> int:
        """Folds for label-free calibration: 0 turns it off; each fold's model needs 2 or more images."""
        if self.folds == 0:
            return 0
        return min(self.folds, n_images) if n_images >= 3 else 0

    def _cluster(self) -> AbstractContextManager:
        """The Ray cluster of a fit with engine "ray" (connected, or started and stopped with the fit)."""
        if self.engine != "ray":
            return nullcontext()
        from gaussad.cluster.session import ray_cluster

        return ray_cluster(self.address)

    def _rereading(
        self,
        levels: Levels,
        plan: FitPlan,
        runner: BatchRunner,
        extractor: Extractor,
        items: Sequence[ImageInput],
        kept: Sequence[int],
        progress: str | None,
    ) -> Stored | Replayed:
        """How the fit reads the features again after its pass: from the stores, or from the backbone run
        again here or on the cluster."""
        if self.feature_store != "none":
            return Stored(levels, self.batch_size)
        again = "fit, again" if progress else None
        if self.engine == "ray":
            from gaussad.cluster.fit import ClusterReplayed

            return ClusterReplayed(levels, plan, extractor, items, kept, self.address, self.actors, again)
        return Replayed(levels, plan, runner, items, kept, again)

    def label_free_thresholds(self, rate: float | None = None) -> tuple[Threshold | None, Threshold | None]:
        """Thresholds for a target false-alarm rate (default: the model's) from the held-out normal results
        kept from the fit (None without them)."""
        self._check_fitted()
        rate = self.max_false_alarm_rate if rate is None else rate
        return _label_free_thresholds(self.state_, rate, self._n_folds(self.state_.n_train))

    # ----------------------------------------------------------------------------------------- scoring
    def _check_engine(self) -> None:
        if self.engine not in ENGINES:
            raise GaussADError(f"--engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if self.actors is not None and self.actors < 1:
            raise GaussADError(f"--actors {self.actors}: expected at least 1")
        if self.feature_store not in FEATURE_STORES:
            raise GaussADError(
                f"--feature-store {self.feature_store!r}: expected one of {', '.join(FEATURE_STORES)}"
            )

    def _skip_errors(self) -> bool:
        if self.on_error not in ON_ERRORS:
            raise GaussADError(f"--on-error {self.on_error!r}: expected one of {', '.join(ON_ERRORS)}")
        return self.on_error == "skip"

    def _check_fitted(self) -> None:
        if not hasattr(self, "state_"):
            raise GaussADError("this GaussAD model is not fitted yet: call fit() or GaussAD.load()")

    def iter_predict(
        self,
        images: ImageInput | Iterable[ImageInput],
        with_maps: bool = True,
        map_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> Iterator[PredictionBatch]:
        """Predictions batch by batch. Streams, so any number of images fits in memory.

        map_sizes gives each image's output map size (default: the image's own size).
        """
        self._check_fitted()
        skip_errors = self._skip_errors()
        items = collect_images(images)
        runner = BatchRunner(
            partial(self.scorer_, with_maps=with_maps),
            self.backbone_.preprocessing,
            self.state_.input_size,
            self.device_,
            self.batch_size,
            self.workers,
            self.max_pixels,
            self.state_.crop,
        )
        for batch in runner.batches(items, "predict" if self.progress else None, skip_errors):
            if batch.outputs is None:
                yield PredictionBatch([], [], [], np.empty(0), [], batch.errors)
                continue
            batch_scores, batch_maps = batch.outputs
            maps: list[np.ndarray] = []
            if with_maps:
                targets = batch.sizes if map_sizes is None else [map_sizes[index] for index in batch.indices]
                maps = [
                    map_in_image(m, window, size, target, resized_array)
                    for m, window, size, target in zip(
                        batch_maps, batch.windows, batch.sizes, targets, strict=True
                    )
                ]
            yield PredictionBatch(
                batch.indices,
                [describe(items[index], index) for index in batch.indices],
                batch.sizes,
                batch_scores.cpu().numpy().astype(np.float64),
                maps,
                batch.errors,
            )

    def predict(self, images: ImageInput | Iterable[ImageInput]) -> Prediction:
        """Scores and anomaly maps of all images."""
        names: list[str] = []
        scores: list[np.ndarray] = []
        maps: list[np.ndarray] = []
        for batch in self.iter_predict(images):
            names += batch.names
            scores.append(batch.scores)
            maps += batch.maps
        return Prediction(names, np.concatenate(scores), maps)

    def score_samples(self, images: ImageInput | Iterable[ImageInput]) -> np.ndarray:
        """Per-image anomaly scores, higher is more anomalous (no maps: faster)."""
        return np.concatenate([batch.scores for batch in self.iter_predict(images, with_maps=False)])

    # ------------------------------------------------------------------------------- fitted attributes
    @property
    def levels_(self) -> tuple[int, ...]:
        return self.state_.levels

    @property
    def map_levels_(self) -> tuple[int, ...]:
        return self.state_.map_levels

    @property
    def position_levels_(self) -> tuple[int, ...]:
        return self.state_.position_levels

    @property
    def image_size_(self) -> ImageSize:
        """The input size as fitted: a square input's side, or (height, width)."""
        return self.state_.image_size

    @property
    def crop_(self) -> Crop | None:
        """The window around each image's part, as shares of its height and width; None: the whole image."""
        return self.state_.crop

    @property
    def input_size_(self) -> tuple[int, int]:
        """The model input's (height, width), square or not."""
        return self.state_.input_size

    @property
    def n_train_(self) -> int:
        return self.state_.n_train

    @property
    def image_gaussians_(self) -> list[Gaussian]:
        return self.state_.image_gaussians

    @property
    def map_gaussians_(self) -> list[Gaussian]:
        return self.state_.map_gaussians

    @property
    def position_gaussian_(self) -> Gaussian | None:
        return self.state_.position_gaussian

    @property
    def held_out_scores_(self) -> np.ndarray:
        return self.state_.held_out_scores

    @property
    def far_out_training_images_(self) -> np.ndarray:
        """Positions, among the training images fitted (those not in `skipped_`), of those whose held-out
        score lies far above the others' (`calibration.far_out`): likely defective, so the label-free
        thresholds leave them out, and worth a look."""
        return np.flatnonzero(~self.state_.calibrated)

    @property
    def threshold_scores_(self) -> np.ndarray:
        """The held-out image scores the label-free image threshold is a quantile of: every fitted training
        image's but the far-out ones' (`far_out_training_images_`)."""
        return self.state_.held_out_scores[self.state_.calibrated]

    def far_out_among(self, images: Sequence[ImageT]) -> list[ImageT]:
        """The far-out training images (`far_out_training_images_`) among `images`, as given to `fit`."""
        skipped = {error.index for error in self.skipped_}
        fitted = [image for index, image in enumerate(images) if index not in skipped]
        return [fitted[position] for position in self.far_out_training_images_]

    @property
    def held_out_map_maxima_(self) -> np.ndarray:
        return self.state_.held_out_map_maxima

    @property
    def image_threshold_(self) -> Threshold | None:
        return self.state_.image_threshold

    @image_threshold_.setter
    def image_threshold_(self, threshold: Threshold | None) -> None:
        self.state_ = self.state_.with_thresholds(threshold, self.state_.pixel_threshold)

    @property
    def pixel_threshold_(self) -> Threshold | None:
        return self.state_.pixel_threshold

    @pixel_threshold_.setter
    def pixel_threshold_(self, threshold: Threshold | None) -> None:
        self.state_ = self.state_.with_thresholds(self.state_.image_threshold, threshold)

    def describe_levels(self) -> list[dict]:
        """Per-Gaussian facts for reports: level, role, channels, components kept, shrinkage."""
        self._check_fitted()
        return self.state_.describe_levels()

    # ------------------------------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the fitted model to a folder (JSON config + safetensors), atomically. The saved parameters
        are the ones the fit used: levels and input size as resolved, the weights file's absolute path."""
        from gaussad.persistence import save_model

        self._check_fitted()
        state = self.state_
        global_levels = list(state.global_levels) if state.global_levels else self.config.global_levels
        fitted = {"global_levels": global_levels, "image_grid": state.image_grid}
        used = self.config.as_dict() | state.resolved_options | fitted
        return save_model(Path(directory), ModelConfig.from_dict(used), state)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "auto", **runtime) -> GaussAD:
        """Read a model saved by `save`, checking its checksums and its backbone's weights. `runtime` sets
        batch_size, workers or progress; `weights` points to a moved weights file (checked by SHA-256)."""
        from gaussad.persistence import load_model

        weights = runtime.pop("weights", None)
        fixed = sorted(set(runtime) & set(MODEL_OPTIONS))
        if fixed:
            raise GaussADError(
                f"{', '.join(fixed)}: fixed by the fitted model in {directory}; fit again to change them"
            )
        unknown = sorted(set(runtime) - set(RUNTIME_OPTIONS))
        if unknown:
            raise GaussADError(
                f"unknown run-time settings {', '.join(unknown)}: expected {', '.join(RUNTIME_OPTIONS)}"
            )
        config, state = load_model(Path(directory))
        saved = state.backbone
        if weights is not None:
            if saved.weights_source != "file":
                raise GaussADError(
                    f"{directory}: backbone {saved.name!r} uses {saved.weights_source} weights, not a file; "
                    "a weights file does not apply"
                )
            config = ModelConfig.from_dict(config.as_dict() | {"weights": os.fspath(weights)})
        model = cls(**vars(config), device=device, **runtime)
        model.state_ = state
        model.device_ = resolve_device(device)
        model.backbone_ = load_backbone(
            saved.name, config.weights if saved.weights_source == "file" else None
        )
        if saved.weights_sha256 and model.backbone_.weights_sha256 != saved.weights_sha256:
            found = model.backbone_
            raise GaussADError(
                f"backbone weights {found.weights_path or found.name} differ from those the model was fitted "
                f"with (SHA-256 {str(found.weights_sha256)[:12]}..., expected {saved.weights_sha256[:12]}...)"
            )
        features = LevelFeatures(
            model.backbone_.to(model.device_, memory_format=torch.channels_last),
            state.extracted_levels,
            config.precision,
        )
        model.scorer_ = _build_scorer(features, state, features.grids(state.input_size), config).to(
            model.device_
        )
        return model


def _part_crop(
    items: Sequence[ImageInput], workers: int, max_pixels: int, skip_errors: bool
) -> tuple[Crop | None, bool]:
    """The window around the part that the training images show (`gaussad.framing.learn_crop`), and whether
    their parts move about (`parts_move`, on the parts found so far where a window is ruled out), from a
    decoding pass over them in threads that stops as soon as their parts rule a window out (a texture, a
    part filling the frame: after the first batch); unreadable images stop it or are left out, as in the
    fit's pass."""
    boxes: list[Box | None] = []
    with decoding_pool(len(items), workers) as pool:
        decode = partial(_decoded_part_box, max_pixels=max_pixels)
        for _, chunk, _ in decoded_batches(items, decode, DEFAULT_BATCH_SIZE, pool, skip_errors):
            boxes += chunk
            if crop_ruled_out(boxes, len(items)):
                return None, parts_move(boxes)
    return learn_crop(boxes), parts_move(boxes)


def _decoded_part_box(item: ImageInput, max_pixels: int) -> Box | None:
    return part_box(load_pixels(item, max_pixels))


def _for_moving_parts(
    config: ModelConfig, moving: bool, global_levels: tuple[int, ...]
) -> tuple[ModelConfig, dict[str, str]]:
    """The config a fit uses where the training images' parts move about the frame (`parts_move`), and the
    rules that decided it (`MOVING_RULES`, by option). The auto localization weighs shared maps alone: a
    per-position Gaussian has no place to know. The combined and auto image scores drop the grid, whose
    cells hold a moving part's pieces in no one place: the combined score's pooled part becomes the
    whole frame's pooling of `global_levels` (the global part), beside the score map's top share, which
    finds a defect wherever it is, while the pooling sees an image that holds no part, or two; without a
    global part, the score map's top share alone. Applied after `_without_folds`: without folds its
    options stand."""
    if not moving:
        return config, {}
    rules = {}
    if config.localization == "auto":
        rules["localization"] = MOVING_RULES["localization"]
    if config.image_score in ("combined", "auto"):
        config, rules["image_score"] = _without_grid(config, global_levels, NO_GRID)
    return config, rules


def _for_few_images(
    config: ModelConfig, rules: dict[str, str], n_images: int, global_levels: tuple[int, ...]
) -> tuple[ModelConfig, dict[str, str]]:
    """The config and rules (`rules` with this one added) of a fit on `n_images` training images: fewer
    than `MIN_IMAGES_FOR_GRID` and the combined and auto image scores drop the grid, whose Gaussians learn
    from one pooled vector per image and cell (`_without_grid`). Applied after `_for_moving_parts`, which
    may have dropped it already; a grid of one cell is the whole frame's pooling and stays."""
    has_grid = config.image_score in ("combined", "auto") and config.image_grid > 1
    if n_images >= MIN_IMAGES_FOR_GRID or not has_grid or "image_score" in rules:
        return config, rules
    reason = (
        f"{n_images} training images are too few for the grid's Gaussians, which learn from one pooled "
        f"vector per image and cell (fewer than {MIN_IMAGES_FOR_GRID})"
    )
    config, rule = _without_grid(config, global_levels, reason)
    return config, rules | {"image_score": rule}


def _without_grid(
    config: ModelConfig, global_levels: tuple[int, ...], reason: str
) -> tuple[ModelConfig, str]:
    """The config of a combined or auto image score without its grid, and the rule that says so: the
    whole frame's pooling of `global_levels` (the global part) in place of the grid, beside the score map's
    top share; without a global part, the score map's top share alone."""
    if global_levels:
        dropped = replace(
            config, image_score="combined", levels=global_levels, image_grid=1, global_levels=()
        )
        return dropped, f"{WITHOUT_GRID}: {reason}"
    return replace(config, image_score="map"), f"map: {reason}"


def _without_folds(config: ModelConfig, n_folds: int) -> tuple[ModelConfig, str | None]:
    """The config a fit uses: `auto` options need held-out folds to choose on, and the combined score
    needs held-out scores for its scales; without folds (--folds 0, or fewer than 3 training images) they
    take `AUTO_FALLBACK`, and the reason is returned."""
    needs_folds = config.image_score in ("auto", "combined") or config.localization == "auto"
    if n_folds >= 2 or not needs_folds:
        return config, None
    image_score, localization = AUTO_FALLBACK
    fixed = replace(
        config,
        image_score=image_score if config.image_score in ("auto", "combined") else config.image_score,
        localization=localization if config.localization == "auto" else config.localization,
    )
    return fixed, (
        f"no held-out folds (--folds 0, or fewer than 3 training images): image score "
        f"{fixed.image_score}, localization {fixed.localization}"
    )


def _fit_mixture_level(
    sample: PatchSample, map_job: Future, config: ModelConfig, folds: Sequence[int | None]
) -> list[GaussianMixture]:
    """A mixture level's full and fold mixtures, once its one Gaussians (`map_job`) give their scale."""
    components = [gaussian.n_components for gaussian in map_job.result()]
    return fit_mixtures(sample, config.mixture_clusters, folds, components, config.reduction, config.variance)


def _fit_pooled_levels(
    features: dict[int, PooledFeatures],
    fold_of: np.ndarray,
    n_folds: int,
    reduction: Reduction,
    variance: float,
) -> list[tuple[Gaussian, list[Gaussian], np.ndarray]]:
    """`gaussad.pooled.fit_level` for each of the levels, one after the other."""
    return [fit_pooled(pooled, fold_of, n_folds, reduction, variance) for pooled in features.values()]


def _pooled_groups(features: dict[int, PooledFeatures]) -> list[dict[int, PooledFeatures]]:
    """One image-score candidate's levels as groups fitted in parallel: each level alone where all are fitted
    from samples, all in one group where any is fitted from sums."""
    if any(pooled.streamed for pooled in features.values()):
        return [features]
    return [{level: pooled} for level, pooled in features.items()]


def _label_free_thresholds(
    state: FittedState, rate: float, n_folds: int
) -> tuple[Threshold | None, Threshold | None]:
    """The (1 - rate) quantiles of the held-out image scores and map maxima (None without calibration), of
    the training images whose score is not far out (`GaussAD.far_out_training_images_`)."""
    if not len(state.held_out_scores):
        return None, None
    check_rate(rate)
    kept = state.calibrated
    where = f"{int(kept.sum())} good training images, {n_folds}-fold held out"
    if not kept.all():
        where += f"; {int((~kept).sum())} far above the others left out, likely defective"
    quantile = f"{1 - rate:.4g} quantile"
    image = quantile_threshold(
        state.held_out_scores[kept], rate, "label-free", f"{quantile} of image scores of {where}"
    )
    pixel = quantile_threshold(
        state.held_out_map_maxima[kept], rate, "label-free", f"{quantile} of map maxima of {where}"
    )
    pixel.normal_level = float(np.median(state.held_out_map_medians[kept]))
    return image, pixel


def _build_scorer(
    features: LevelFeatures, state: FittedState, grids: dict[int, Grid], config: ModelConfig
) -> Scorer:
    """The scorer of a fitted state: the backbone's levels, the image head and the map head."""
    image_head = ImageHead(state.image_gaussians, [grids[level] for level in state.levels], state.image_grid)
    head = map_head(state.map_gaussians, state.position_gaussian, state, grids, config.blur_sigma)
    global_head = None
    if state.global_levels:
        global_head = ImageHead(state.global_gaussians, [grids[level] for level in state.global_levels], 1)
    return Scorer(
        features,
        state.levels,
        state.map_gaussian_levels,
        state.position_levels,
        image_head,
        head,
        state.image_score,
        state.score_scales,
        state.global_levels,
        global_head,
    )
