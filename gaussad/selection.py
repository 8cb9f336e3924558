"""Choosing `auto` options from good images alone: each candidate's proxy metrics, and the choice.

Held-out folds give normal examples the models have not seen; synthetic defects pasted into held-out good
images (`gaussad.synthetic`) give anomalous ones, with masks. Each candidate localization is scored by the
AUPRO of its maps on the pasted patches (`LOCALIZATION_KIND`), each candidate image score by the image
AUROC of its held-out normal scores against all synthetic defects' scores. Candidates are weighed in a fixed
order, the combined image score and the paper's shared maps first, and a later one displaces the best so
far only when it is better beyond the proxy's noise: for image scores, in at least 95% of paired bootstrap
resamples of the images; for maps, by `MARGIN`. The proxy's defects are not the user's, so a small lead on
them is no reason to leave a setting that holds up on real defects. Everything here is numbers in, numbers
out: the models live in `gaussad.model`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from gaussad.metrics import image_auroc, pixel_metrics
from gaussad.synthetic import KINDS

MAX_SYNTHETIC_IMAGES = 128  # enough to rank candidates; bounds the extra backbone pass of a fit
# The localization proxy reads every 4th row and column of the maps: they are blurred and upsampled from
# grids of 28 cells or fewer at 224 px, and the sort behind AUPRO takes 16 times less (7 s -> 0.5 s).
PROXY_STRIDE = 4
# The kind of synthetic defect whose AUPRO weighs localizations. The blend mixes in another image turned
# by a quarter: content out of place, which a per-position Gaussian catches by construction, so it favoured
# hybrid maps on 7 of 8 development sets, three of the four where shared maps are better on real defects.
LOCALIZATION_KIND = "patch"
# The kinds of synthetic defect each auto option weighs: a chosen image score reads both kinds, a chosen
# localization only its proxy's, so a fit that chooses only the localization scores no others.
OPTION_KINDS = {"image_score": KINDS, "localization": (LOCALIZATION_KIND,)}
# How much better a localization's proxy must be to displace an earlier one.
MARGIN = 0.002
BOOTSTRAP_RESAMPLES = 400
CONFIDENCE = 0.95  # share of resamples in which a later image score must beat the best so far


@dataclass
class Candidate:
    """One candidate's proxy inputs: normal held-out values and synthetic ones."""

    name: str
    normal_scores: np.ndarray  # held-out good images' image scores
    synthetic_scores: np.ndarray  # synthetic defects' image scores


def proxy_description(kinds: Sequence[str]) -> str:
    """What the auto options were weighed on, as the saved evidence says it."""
    made = ", ".join(kinds)
    return f"synthetic defects ({made}) pasted into held-out good images, scored by the fold models"


def weighed_kinds(options: Sequence[str]) -> tuple[str, ...]:
    """The kinds of synthetic defect that the given auto options weigh, in `KINDS` order."""
    wanted = {kind for option in options for kind in OPTION_KINDS[option]}
    return tuple(kind for kind in KINDS if kind in wanted)


def synthetic_sample(n_images: int, limit: int = MAX_SYNTHETIC_IMAGES) -> np.ndarray:
    """Indices of the training images that receive a synthetic defect: evenly spread, at most `limit`."""
    count = min(n_images, limit)
    return np.unique(np.linspace(0, n_images - 1, count).round().astype(int))


def localization_evidence(
    masks: np.ndarray, maps: dict[str, np.ndarray], kinds: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per localization, pixel AUROC and AUPRO of its maps (N, H, W) on the synthetic masks (N, H, W),
    overall and per kind of defect; the proxy is the AUPRO on `LOCALIZATION_KIND` (on all defects where
    there is none of that kind)."""
    kinds = np.asarray(kinds)
    masks = masks[:, ::PROXY_STRIDE, ::PROXY_STRIDE]
    evidence: dict[str, dict[str, float]] = {}
    for name, values in maps.items():
        values = values[:, ::PROXY_STRIDE, ::PROXY_STRIDE]
        auroc, pro = pixel_metrics(masks, values)
        by_kind = {
            f"aupro_{kind}": pixel_metrics(masks[kinds == kind], values[kinds == kind])[1]
            for kind in KINDS
            if (kinds == kind).any()
        }
        proxy = by_kind.get(f"aupro_{LOCALIZATION_KIND}", pro)
        evidence[name] = {"pixel_auroc": auroc, "aupro": pro, "proxy": proxy, **by_kind}
    return evidence


def image_score_evidence(
    candidates: Sequence[Candidate], kinds: Sequence[str], seed: int = 0
) -> tuple[str, dict[str, dict[str, float]]]:
    """The chosen image score and, per candidate, the image AUROC of its held-out normal against its
    synthetic scores (overall and per kind of defect) and the share of paired bootstrap resamples in which
    it beat the candidate chosen before it was weighed ("wins")."""
    kinds = np.asarray(kinds)
    evidence: dict[str, dict[str, float]] = {}
    for candidate in candidates:
        row = {"proxy": _auroc(candidate.normal_scores, candidate.synthetic_scores)}
        for kind in KINDS:
            if (kinds == kind).any():
                row[f"auroc_{kind}"] = _auroc(
                    candidate.normal_scores, candidate.synthetic_scores[kinds == kind]
                )
        evidence[candidate.name] = row
    resampled = _bootstrap_aurocs(candidates, seed)
    best = 0
    for index in range(1, len(candidates)):
        wins = float(np.mean(resampled[index] > resampled[best]))
        evidence[candidates[index].name]["wins"] = wins
        if wins >= CONFIDENCE:
            best = index
    return candidates[best].name, evidence


def _bootstrap_aurocs(candidates: Sequence[Candidate], seed: int) -> np.ndarray:
    """(candidates, resamples) image AUROCs on the same resamples of normal and synthetic images."""
    rng = np.random.default_rng(seed)
    n_normal, n_synthetic = len(candidates[0].normal_scores), len(candidates[0].synthetic_scores)
    normal = rng.integers(0, n_normal, (BOOTSTRAP_RESAMPLES, n_normal))
    synthetic = rng.integers(0, n_synthetic, (BOOTSTRAP_RESAMPLES, n_synthetic))
    aurocs = np.empty((len(candidates), BOOTSTRAP_RESAMPLES))
    for index, candidate in enumerate(candidates):
        values = np.concatenate(
            [candidate.normal_scores[normal], candidate.synthetic_scores[synthetic]], axis=1
        )
        ranks = rankdata(values, axis=1)
        wins = ranks[:, n_normal:].sum(axis=1) - n_synthetic * (n_synthetic + 1) / 2
        aurocs[index] = wins / (n_normal * n_synthetic)
    return aurocs


def choose(evidence: dict[str, dict[str, float]]) -> str:
    """The candidate with the best proxy; one must beat an earlier one by more than `MARGIN`."""
    names = list(evidence)
    best = names[0]
    for name in names[1:]:
        if evidence[name]["proxy"] > evidence[best]["proxy"] + MARGIN:
            best = name
    return best


OPTIONS = ("localization", "image_score")  # the auto options, as the evidence names them


def candidate_rows(selection: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any], bool]]:
    """(option, candidate, its proxy metrics, whether chosen) for every candidate of the saved evidence,
    read defensively: a model file's evidence is shown, never trusted to be well formed."""
    for option in OPTIONS:
        part = selection.get(option) or {}
        for name, metrics in (part.get("candidates") or {}).items():
            yield option, name, metrics if isinstance(metrics, dict) else {}, name == part.get("chosen")


def summary(selection: dict[str, Any] | None) -> dict[str, str]:
    """One line per auto option for reports: each candidate's proxy, the chosen one starred; or why
    there was no choice."""
    if not selection:
        return {}
    if "fallback" in selection:
        return {"auto options": str(selection["fallback"])}
    proxies: dict[str, list[str]] = {option: [] for option in OPTIONS}
    for option, name, metrics, chosen in candidate_rows(selection):
        proxies[option].append(f"{name}{'*' if chosen else ''} {metrics.get('proxy', float('nan')):.4f}")
    named = {f"auto {option.replace('_', ' ')} (proxy)": rows for option, rows in proxies.items()}
    lines = {name: ", ".join(rows) for name, rows in named.items() if rows}
    return lines | {f"{option.replace('_', ' ')} (rule)": rule for option, rule in rules(selection).items()}


def rules(selection: dict[str, Any]) -> dict[str, str]:
    """Per option, the rule that decided it or narrowed its candidates, where one did (read defensively,
    as `candidate_rows`)."""
    parts = {option: selection.get(option) for option in OPTIONS}
    found = {option: part.get("rule") for option, part in parts.items() if isinstance(part, dict)}
    return {option: rule for option, rule in found.items() if isinstance(rule, str)}


def _auroc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    return image_auroc(labels, np.r_[normal, anomalous])
