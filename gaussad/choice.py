"""The fit's `auto` choices, between its Gaussians and its fitted state: synthetic defects pasted into
held-out training images (`gaussad.synthetic`) go through the fold models that did not see their originals,
and what those models say (maps, the score maps' top shares, pooled scores) becomes the evidence that
`gaussad.selection` weighs. `finish_state` then gives the fitted state its image score and localization, as
configured or as chosen, with the held-out results that calibrate them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from gaussad.config import ModelConfig
from gaussad.features import BatchRunner, pool_features
from gaussad.gaussian import Gaussian
from gaussad.heldout import FoldHeads, HeldOutMaps, level_inputs
from gaussad.maps import top_share_mean
from gaussad.scorer import LevelFeatures, combined_scores
from gaussad.selection import (
    Candidate,
    choose,
    image_score_evidence,
    localization_evidence,
    proxy_description,
)
from gaussad.state import FittedState
from gaussad.synthetic import KINDS, synthetic_defects

# Image-score candidates of `auto` in the order they are weighed: a later one must beat the best so far
# beyond the proxy's noise. The combination first: across the development data it never loses much, where
# pooled features and the map each lose a lot somewhere (benchmarks/results/tune_defaults.md).
IMAGE_SCORE_ORDER = ("combined", "pooled", "map", "global")


@dataclass
class SyntheticDefects:
    """Synthetic defects in training images: the fold of the image each was made from, its mask and kind,
    and its backbone features (N, C, H, W) per level (one backbone pass)."""

    folds: np.ndarray
    masks: np.ndarray
    kinds: list[str]
    features: dict[int, torch.Tensor]


@dataclass
class FoldResults:
    """What the fold models say: the localization chosen (or configured), its held-out maps and the
    evidence that chose it; synthetic defects' score maps' top shares per localization and pooled scores
    per image-score candidate, each by fold."""

    localization: str
    held_out: HeldOutMaps
    map_evidence: dict[str, dict[str, float]] | None
    synthetic_tops: dict[str, dict[int, np.ndarray]]
    synthetic_pooled: dict[str, dict[int, np.ndarray]]


@dataclass
class PastedDefects:
    """Synthetic defects pasted into sampled training images, before their backbone pass: the fold of the
    image each was made from, the defective (N, H, W, 3) uint8 images, their masks and kinds."""

    folds: np.ndarray
    images: np.ndarray
    masks: np.ndarray
    kinds: list[str]


def paste_synthetic_defects(samples: Sequence[tuple[int, np.ndarray]], kinds: Sequence[str]) -> PastedDefects:
    """Paste synthetic defects into the sampled training images ((fold, pixels) pairs) and keep those of the
    weighed `kinds`. The others are made and dropped, so that a kind's defects are the same whichever kinds
    are weighed. Seeded numpy alone: the fit makes them while it fits its Gaussians."""
    folds = np.array([fold for fold, _ in samples])
    pixels = np.stack([values for _, values in samples])
    defective, masks, made = synthetic_defects(pixels, pixels)
    kept = np.isin(made, kinds)
    return PastedDefects(folds[kept], defective[kept], masks[kept], [kind for kind in made if kind in kinds])


def synthetic_defect_features(
    pasted: PastedDefects, runner: BatchRunner, features: LevelFeatures
) -> SyntheticDefects:
    """The pasted defects' backbone features, in one pass."""
    parts: list[list[torch.Tensor]] = []
    with torch.inference_mode():
        for start in range(0, len(pasted.images), runner.batch_size):
            outputs = features(runner.normalize(pasted.images[start : start + runner.batch_size]))
            parts.append([output.cpu() for output in outputs])
    stacked = {level: torch.cat([part[i] for part in parts]) for i, level in enumerate(features.levels)}
    return SyntheticDefects(pasted.folds, pasted.masks, pasted.kinds, stacked)


def synthetic_results(
    heads: FoldHeads,
    state: FittedState,
    localizations: Sequence[str],
    pooled_models: dict[str, tuple[tuple[Sequence[int], int], list[list[Gaussian]]]],
    synthetic: SyntheticDefects | None,
    n_folds: int,
) -> tuple[
    dict[str, dict[int, np.ndarray]], dict[str, dict[int, np.ndarray]], dict[str, dict[int, np.ndarray]]
]:
    """What the fold models say about the synthetic defects made from their held-out images: anomaly maps
    and the score maps' top shares per candidate localization and, per image-score candidate
    (pooled_models: its (levels, grid) and fold Gaussians [fold][level]), image scores; each by fold.
    Empty without synthetic defects."""
    maps_by_fold: dict[str, dict[int, np.ndarray]] = {name: {} for name in localizations}
    tops_by_fold: dict[str, dict[int, np.ndarray]] = {name: {} for name in localizations}
    pooled_by_fold: dict[str, dict[int, np.ndarray]] = {name: {} for name in pooled_models}
    if synthetic is None:
        return maps_by_fold, tops_by_fold, pooled_by_fold
    for fold in range(n_folds):
        members = np.flatnonzero(synthetic.folds == fold)
        by_level = {level: values[members] for level, values in synthetic.features.items()}
        level_features, stacked = level_inputs(by_level, state.map_gaussian_levels, state.position_levels)
        for name, (maps, score_maps) in heads.maps(fold, level_features, stacked, localizations).items():
            maps_by_fold[name][fold] = maps.cpu().numpy()
            tops_by_fold[name][fold] = top_share_mean(score_maps).cpu().numpy()
        for name, ((levels, grid), fold_gaussians) in pooled_models.items():
            pooled = [pool_features(by_level[lv], grid).to("cpu", torch.float64).numpy() for lv in levels]
            pooled_by_fold[name][fold] = sum(
                gaussian.component_distances(values)
                for gaussian, values in zip(fold_gaussians[fold], pooled, strict=True)
            )
    return maps_by_fold, tops_by_fold, pooled_by_fold


def choose_localization(
    config: ModelConfig,
    localizations: Sequence[str],
    synthetic: SyntheticDefects | None,
    synthetic_maps: dict[str, dict[int, np.ndarray]],
) -> tuple[str, dict[str, dict[str, float]] | None]:
    """The localization as configured or, for `auto`, as chosen by its proxy on the synthetic defects'
    maps (by fold), and that evidence (None without synthetic defects). Only the chosen localization's
    held-out maps are then needed: the choice reads the synthetic defects alone."""
    if synthetic is None:
        return localizations[0], None
    joined = {name: _joined(maps, synthetic.folds) for name, maps in synthetic_maps.items()}
    evidence = localization_evidence(synthetic.masks, joined, synthetic.kinds)
    return (choose(evidence) if config.localization == "auto" else localizations[0]), evidence


def _joined(by_fold: dict[int, np.ndarray], folds: np.ndarray) -> np.ndarray:
    """Per synthetic image, in sample order, from the per-fold parts."""
    values = np.empty((len(folds), *next(iter(by_fold.values())).shape[1:]), dtype=np.float64)
    for fold, part in by_fold.items():
        values[folds == fold] = part
    return values


def finish_state(
    state: FittedState,
    config: ModelConfig,
    folded: FoldResults,
    synthetic: SyntheticDefects | None,
    held_out: dict[str, tuple[np.ndarray, list[list[Gaussian]]]],
    image_gaussians: dict[str, list[Gaussian]],
    pooled_sets: dict[str, tuple[Sequence[int], int]],
    mixtures: dict[int, Gaussian],
) -> FittedState:
    """The fitted state with the image score and localization as configured or, for `auto`, as chosen
    on synthetic defects, and the held-out results that calibrate them; hybrid maps take the `mixtures`
    (by level) in place of those levels' one Gaussian."""
    localization, image_choice = folded.localization, config.image_score
    selection = None
    if synthetic is not None:
        selection = {
            "proxy": proxy_description([kind for kind in KINDS if kind in synthetic.kinds]),
            "synthetic_images": len(synthetic.folds),
            "localization": {"candidates": folded.map_evidence, "chosen": localization},
        }
        if config.image_score == "auto":
            synthetic_pooled = {
                name: _joined(scores, synthetic.folds) for name, scores in folded.synthetic_pooled.items()
            }
            tops = _joined(folded.synthetic_tops[localization], synthetic.folds)
            image_choice, score_evidence = _choose_image_score(
                synthetic.kinds, held_out, synthetic_pooled, folded.held_out.tops, tops
            )
            selection["image_score"] = {"candidates": score_evidence, "chosen": image_choice}
    maps = folded.held_out
    pooled_name = "global" if image_choice == "global" else "pooled"
    levels, grid = pooled_sets[pooled_name]
    pooled_normal = held_out[pooled_name][0]
    kind = "pooled" if image_choice == "global" else image_choice
    combined = kind == "combined"
    with_global = combined and "global" in pooled_sets  # a combined score with its global part
    global_normal = held_out["global"][0] if with_global else None
    scales = score_scales(pooled_normal, maps.tops, global_normal) if combined else (1.0, 1.0)
    normal_scores = {
        "pooled": pooled_normal,
        "map": maps.tops,
        "combined": combined_scores(pooled_normal, maps.tops, scales, global_normal),
    }[kind]
    hybrid = localization == "hybrid"
    map_gaussians = state.map_gaussians
    if hybrid:
        levels_of = state.map_gaussian_levels
        map_gaussians = [mixtures.get(level, g) for level, g in zip(levels_of, map_gaussians, strict=True)]
    # A pooled score has no map part: the score map's own Gaussians go.
    if kind == "pooled":
        kept = [level in state.map_levels for level in state.map_gaussian_levels]
        map_gaussians = [gaussian for gaussian, keep in zip(map_gaussians, kept, strict=True) if keep]
    return replace(
        state,
        score_map_levels=state.score_map_levels if kind != "pooled" else (),
        map_gaussians=map_gaussians,
        levels=tuple(levels),
        image_gaussians=image_gaussians[pooled_name],
        image_grid=grid,
        image_score=kind,
        global_levels=tuple(pooled_sets["global"][0]) if with_global else (),
        global_gaussians=image_gaussians["global"] if with_global else [],
        score_scales=scales,
        position_levels=state.position_levels if hybrid else (),
        position_gaussian=state.position_gaussian if hybrid else None,
        held_out_scores=normal_scores if len(maps.tops) else np.empty(0),
        held_out_map_maxima=maps.maxima,
        held_out_map_medians=maps.medians,
        selection=selection,
    )


def _choose_image_score(
    kinds: Sequence[str],
    held_out: dict[str, tuple[np.ndarray, list[list[Gaussian]]]],
    synthetic_pooled: dict[str, np.ndarray],
    normal_tops: np.ndarray,
    synthetic_tops: np.ndarray,
) -> tuple[str, dict[str, dict[str, float]]]:
    """The image score `auto` chooses, and its evidence: each pooled candidate (by name, held-out and
    synthetic scores), the map's top share and the combined score, weighed in `IMAGE_SCORE_ORDER`."""
    candidates = [Candidate(name, held_out[name][0], synthetic_pooled[name]) for name in synthetic_pooled]
    pooled_normal, pooled_synthetic = held_out["pooled"][0], synthetic_pooled["pooled"]
    global_normal = held_out["global"][0] if "global" in held_out else None
    global_synthetic = synthetic_pooled.get("global")
    scales = score_scales(pooled_normal, normal_tops, global_normal)
    candidates += [
        Candidate("map", normal_tops, synthetic_tops),
        Candidate(
            "combined",
            combined_scores(pooled_normal, normal_tops, scales, global_normal),
            combined_scores(pooled_synthetic, synthetic_tops, scales, global_synthetic),
        ),
    ]
    order = {name: index for index, name in enumerate(IMAGE_SCORE_ORDER)}
    candidates.sort(key=lambda candidate: order[candidate.name])
    return image_score_evidence(candidates, kinds)


def score_scales(pooled: np.ndarray, tops: np.ndarray, whole: np.ndarray | None) -> tuple[float, ...]:
    """The combined score's scales: the spread (standard deviation) of the held-out pooled scores, map top
    shares and global scores, so that each part weighs by how far it moves from normal in its own normal
    spread (a z-score sum, up to a constant; measured against other ways in docs/design.md)."""
    parts = (pooled, tops) if whole is None else (pooled, tops, whole)
    return tuple(float(np.std(part)) or 1.0 for part in parts)
