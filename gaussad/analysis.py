"""Per-level results of a fitted model, for ablations and tuning (the benchmarks): what each image level
adds to the score and each map level's own map, before they are combined. The maps are on the whole
image's grid, so the model must see whole images (`crop="none"`, or no window learnt)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from gaussad.errors import GaussADError
from gaussad.features import BatchRunner
from gaussad.images import ImageInput, collect_images
from gaussad.model import GaussAD


@dataclass
class LevelResults:
    """Per-level results of all images, on the CPU."""

    distances: np.ndarray  # (N, image levels): component distance of each level's grid-pooled features
    level_maps: list[torch.Tensor]  # per map level: (N, h, w) distances on that level's grid
    position_maps: torch.Tensor | None  # hybrid maps: (N, h, w) per-position distances, else None


def level_results(model: GaussAD, images: ImageInput | Iterable[ImageInput]) -> LevelResults:
    """The parts the model's scores and maps are made of, from the same scorer (`model.scorer_`)."""
    scorer = model.scorer_

    def parts(batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        features = scorer.features(batch)
        distances = scorer.image_head([features[i] for i in scorer.image_indices])
        level_maps = scorer.map_head.level_maps([features[i] for i in scorer.map_indices])
        stacked = scorer.stack_position([features[i] for i in scorer.position_indices])
        return distances, level_maps, scorer.map_head.position_map(stacked) if stacked is not None else None

    model._check_fitted()
    if model.crop_ is not None:
        raise GaussADError("per-level results need a model of whole images: fit it with crop='none'")
    runner = BatchRunner(
        parts,
        model.backbone_.preprocessing,
        model.input_size_,
        model.device_,
        model.batch_size,
        model.workers,
    )
    distances, level_maps, position_maps = [], [[] for _ in model.state_.map_gaussian_levels], []
    for batch in runner.batches(collect_images(images)):
        batch_distances, batch_maps, batch_position = batch.outputs
        distances.append(batch_distances.cpu())
        for store, level_map in zip(level_maps, batch_maps, strict=True):
            store.append(level_map.cpu())
        if batch_position is not None:
            position_maps.append(batch_position.cpu())
    return LevelResults(
        torch.cat(distances).numpy(),
        [torch.cat(store) for store in level_maps],
        torch.cat(position_maps) if position_maps else None,
    )
