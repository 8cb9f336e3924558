"""The fit's pass over the training images: what it keeps of each batch of backbone features.

The pass is the same wherever it runs: in the fitting process, where each level's features go straight into
its `LevelAccumulator`, or on a worker that holds one shard of the images (`gaussad.cluster.fit`), where
they are held as `HeldLevel`s and handed over to the fit's accumulators in input order. `FitPlan` says what
to keep, `Extractor` how to build the backbone's runner; both travel to workers as they are. A fit that
keeps no feature store runs the backbone again (`replayed`) where it would have read the store.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from gaussad.accumulate import LevelAccumulator, positional_values
from gaussad.backbones import TappedBackbone, load_backbone
from gaussad.config import ImageSize
from gaussad.decoding import ImageError
from gaussad.errors import GaussADError
from gaussad.features import BatchRunner, pool_features, resolve_device, stack_levels
from gaussad.framing import Crop
from gaussad.images import ImageInput
from gaussad.mixture import PatchSample
from gaussad.moments import Moments
from gaussad.pooled import PooledFeatures
from gaussad.scorer import LevelFeatures


@dataclass(frozen=True)
class Extractor:
    """How a process runs the backbone over training images: everything a worker needs to build it."""

    backbone: str
    weights: str | None
    levels: tuple[int, ...]  # the levels extracted
    precision: str
    input_size: ImageSize
    device: str
    batch_size: int
    workers: int
    max_pixels: int
    crop: Crop | None = None  # the window around each image's part (`gaussad.framing`), if any

    def runner(self, backbone: TappedBackbone | None = None) -> BatchRunner:
        """A runner yielding the extracted levels' feature maps per batch (`backbone`: one already loaded)."""
        device = resolve_device(self.device)
        backbone = backbone or load_backbone(self.backbone, self.weights)
        features = LevelFeatures(
            backbone.to(device, memory_format=torch.channels_last), self.levels, self.precision
        )
        return BatchRunner(
            features,
            backbone.preprocessing,
            self.input_size,
            device,
            self.batch_size,
            self.workers,
            self.max_pixels,
            self.crop,
        )


@dataclass(frozen=True)
class FitPlan:
    """What the pass keeps of each batch: image-score candidates' pooled features (name: (levels, grid)),
    the map levels' and the stacked position levels' feature vectors with each image's fold, a sample of
    the `mixture_levels`' vectors (`PatchSample`, `patches_per_image` of each image) and the model inputs of
    the images `sampled` for synthetic defects."""

    extracted: tuple[int, ...]
    map_levels: tuple[int, ...]
    position_levels: tuple[int, ...]
    pooled_sets: dict[str, tuple[tuple[int, ...], int]]
    per_position_maps: bool
    n_folds: int
    n_images: int  # the inputs, in contiguous folds (as scikit-learn's KFold)
    sampled: frozenset[int]
    stored: bool = True  # whether the fit keeps the feature vectors (a worker then sends them)
    mixture_levels: tuple[int, ...] = ()  # some of the map levels
    patches_per_image: int = 0

    def __post_init__(self) -> None:
        if not set(self.mixture_levels) <= set(self.map_levels):
            raise ValueError(f"mixture levels {self.mixture_levels} outside the map levels {self.map_levels}")

    def patch_samples(self) -> dict[int, PatchSample]:
        """An empty sample per mixture level."""
        return {level: PatchSample(self.patches_per_image) for level in self.mixture_levels}

    def level_values(self, by_level: dict[int, torch.Tensor], level: int | None) -> torch.Tensor:
        """The feature maps a level's accumulator takes: a map level's own, or (None) the position levels'
        stacked."""
        if level is None:
            return stack_levels([by_level[lv] for lv in self.position_levels])
        return by_level[level]

    def folds_of(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The folds of the inputs at `indices`: a batch then spans one or two folds, and per-position sums
        take one in-place product per fold present."""
        return np.asarray(indices, dtype=np.int64) * self.n_folds // self.n_images


@dataclass
class PassResult:
    """What the pass gives the fit besides the accumulated levels, in input order."""

    kept: list[int] = field(default_factory=list)  # the inputs read
    skipped: list[ImageError] = field(default_factory=list)
    samples: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (fold, model input)

    def extend(self, other: PassResult) -> None:
        """Append the result of the inputs that follow."""
        self.kept += other.kept
        self.skipped += other.skipped
        self.samples += other.samples


class HeldLevel:
    """One level's moments and (where the fit stores them) float32 feature vectors over a shard of images,
    held in memory until they join the fit's `LevelAccumulator` (`hand_over`)."""

    def __init__(self, per_position: bool, n_folds: int, stored: bool = True) -> None:
        self.moments = Moments(per_position, n_folds)
        self.stored = stored
        self.values: list[np.ndarray] = []

    def add(self, features: torch.Tensor, folds: Sequence[int]) -> None:
        self.add_values(positional_values(features), features.shape[-2:], folds)

    def add_values(self, values: torch.Tensor, grid: tuple[int, int], folds: Sequence[int]) -> None:
        """A batch's feature vectors (B, P, C; `positional_values`) on a grid of P positions."""
        if self.stored:
            self.values.append(values.numpy())
        self.moments.add(values, grid, folds)

    def hand_over(self, accumulator: LevelAccumulator) -> None:
        """Store the held values and merge the moments into `accumulator` (after the images before them)."""
        if self.values:
            accumulator.store_values(torch.from_numpy(np.concatenate(self.values)))
        accumulator.add_moments(self.moments)


class HeldPooled:
    """One level's pooled features over a shard of images, held until they join the fit's store: fewer
    bytes than their sums (the dimension is in the thousands, a shard's images in the tens)."""

    def __init__(self) -> None:
        self.values: list[np.ndarray] = []

    def add(self, values: np.ndarray) -> None:
        self.values.append(values)

    def hand_over(self, features: PooledFeatures) -> None:
        if self.values:
            features.add(np.concatenate(self.values))


def run_pass(
    plan: FitPlan,
    runner: BatchRunner,
    items: Sequence[ImageInput],
    levels: dict[int, LevelAccumulator | HeldLevel],
    position: LevelAccumulator | HeldLevel | None,
    pooled: dict[str, dict[int, PooledFeatures | HeldPooled]],
    samples: dict[int, PatchSample],
    first: int = 0,
    progress: str | None = None,
    skip_errors: bool = False,
) -> PassResult:
    """Run the backbone over `items` (inputs first, first + 1, ...), adding each map level's features to
    `levels`, the stacked position levels' to `position`, each image-score candidate's pooled features
    (float32, as pooled) to `pooled[name][level]` and each mixture level's sample to `samples`."""
    result = PassResult()
    for batch in runner.batches(items, progress, skip_errors, keep_pixels=bool(plan.sampled)):
        result.skipped += [replace(error, index=first + error.index) for error in batch.errors]
        if batch.outputs is None:
            continue
        indices = [first + index for index in batch.indices]
        result.kept += indices
        folds = plan.folds_of(indices).tolist()
        by_level = dict(zip(plan.extracted, batch.outputs, strict=True))
        for name, (lvs, grid) in plan.pooled_sets.items():
            for level in lvs:
                pooled[name][level].add(pool_features(by_level[level], grid).to("cpu", torch.float32).numpy())
        for level, sink in levels.items():
            values = positional_values(by_level[level])
            sink.add_values(values, by_level[level].shape[-2:], folds)
            if level in samples:  # a mixture level is a map level: its vectors are converted once
                samples[level].add(values.numpy(), indices, folds)
        if position is not None:
            position.add(plan.level_values(by_level, None), folds)
        result.samples += [  # copies: a view would keep its whole batch's inputs alive
            (fold, batch.pixels[row].copy())
            for row, (index, fold) in enumerate(zip(indices, folds, strict=True))
            if index in plan.sampled
        ]
    return result


def replayed(
    plan: FitPlan,
    runner: BatchRunner,
    items: Sequence[ImageInput],
    kept: np.ndarray,
    progress: str | None = None,
    first: int = 0,
) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
    """The backbone run again over `items` (inputs first, first + 1, ...) in the batches of the pass: per
    batch, the row of its first kept image (its place among the `kept` inputs, sorted, which is the
    accumulators' order) and the float32 feature maps of its kept images by extracted level. A kept image
    that cannot be read again is an error naming it."""
    low, high = np.searchsorted(kept, [first, first + len(items)])
    rows = dict(zip(kept[low:high].tolist(), range(low, high), strict=True))
    expected = int(low)
    for batch in runner.batches(items, progress, skip_errors=True):
        lost = [error for error in batch.errors if first + error.index in rows]
        if lost:
            raise GaussADError(f"{lost[0].message} (read once already: it changed during the fit)")
        if batch.outputs is None:
            continue
        selected = [position for position, index in enumerate(batch.indices) if first + index in rows]
        if not selected:
            continue
        if rows[first + batch.indices[selected[0]]] != expected:  # an image read in the pass is missing
            raise GaussADError("the training images changed during the fit")
        expected += len(selected)
        take = torch.tensor(selected, device=batch.outputs[0].device)
        yield (
            expected - len(selected),
            {
                level: output.index_select(0, take).float()
                for level, output in zip(plan.extracted, batch.outputs, strict=True)
            },
        )
    if expected != high:
        raise GaussADError("the training images changed during the fit")
