"""The hybrid map's shared half as a mixture: per map level, K Gaussians over clusters of normal patches.

One Gaussian per level spans every kind of normal patch at once; where a part has faces unlike each other
(or lies on a background) it also spans the empty space between them, and a defect that falls there scores
low. A mixture cuts the training patches into K k-means clusters and fits one reduced Ledoit-Wolf Gaussian
to each: a patch's distance is its smallest over the K. As the hybrid map's shared half it raises AUPRO
on every development set that takes hybrid maps; as the shared map alone it loses on most of the others
(docs/design.md, Localization), so shared maps keep one Gaussian per level.

Clusters and Gaussians are fitted on a sample of the training patches (`PatchSample`): the same vectors of
each image whatever the order or sharding of the pass, so a fit on a Ray cluster equals a local one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.cluster import KMeans

from gaussad.gaussian import Gaussian, Reduction, fit_gaussian

# Patches sampled per level over all training images. Mixtures fitted on 20,000 or on every patch give hybrid
# maps within 0.003 AUPRO and 0.005 pixel AUROC of each other on the tiles, their crop and the bottle strips;
# k-means and the Gaussians of 8 clusters then take 1.2 s for bottle's three map levels, full and fold models.
SAMPLE_BUDGET = 20_000
SAMPLE_SEED = 0
# Fewer patches than this outside a held-out fold leave a cluster out of that fold's model; where none has
# as many (a few small images), the model is one Gaussian over the fold's sampled patches.
MIN_CLUSTER_PATCHES = 8


class GaussianMixture(Gaussian):
    """K Gaussians over one level's features: mean (K, C), whitening (K, C, d). A feature's distance is the
    smallest of its K Mahalanobis distances; each Gaussian's whitening is scaled (and padded with zero
    columns to the largest d) so that its distances are per component on the scale of the level's one
    Gaussian, as `mixture_distance_map` computes them."""

    @property
    def n_clusters(self) -> int:
        return int(self.mean.shape[0])

    def astype(self, dtype: np.dtype | type) -> GaussianMixture:
        return GaussianMixture(self.mean.astype(dtype), self.whitening.astype(dtype), self.shrinkage)


class PatchSample:
    """A fixed number of each training image's feature vectors at one level, chosen from the image's index
    alone (any batching or sharding of the images picks the same ones), with each vector's fold."""

    def __init__(self, per_image: int) -> None:
        self.per_image = per_image
        self.rows: list[np.ndarray] = []
        self.folds: list[np.ndarray] = []

    @classmethod
    def for_images(cls, n_images: int, budget: int = SAMPLE_BUDGET) -> PatchSample:
        return cls(max(1, math.ceil(budget / n_images)))

    def add(self, values: np.ndarray, indices: Sequence[int], folds: Sequence[int]) -> None:
        """Sample the feature vectors (B, P, C; `accumulate.positional_values`) of the images at `indices`
        (their places among the inputs)."""
        positions = values.shape[1]
        for image, index, fold in zip(values, indices, folds, strict=True):
            chosen = np.random.default_rng([SAMPLE_SEED, index]).permutation(positions)[: self.per_image]
            self.rows.append(image[np.sort(chosen)])
            self.folds.append(np.full(len(chosen), fold))

    def extend(self, other: PatchSample) -> None:
        """Append the sample of the images that follow (a shard's)."""
        self.rows += other.rows
        self.folds += other.folds

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The sampled vectors (N, C), float64, and their folds (N,)."""
        return np.concatenate(self.rows).astype(np.float64), np.concatenate(self.folds)


def fit_mixtures(
    sample: PatchSample,
    n_clusters: int,
    exclude_folds: Sequence[int | None],
    one_components: Sequence[int],
    reduction: Reduction,
    variance: float,
) -> list[GaussianMixture]:
    """One mixture per entry of `exclude_folds` (None: all images; f: all outside fold f), on the same
    clusters (k-means on the whole sample, seeded): one Gaussian per cluster from the patches outside the
    fold, each scaled to the case's one Gaussian of `one_components` components."""
    rows, folds = sample.arrays()
    n_clusters = max(1, min(n_clusters, len(rows) // MIN_CLUSTER_PATCHES))
    labels = KMeans(n_clusters, n_init=2, random_state=SAMPLE_SEED).fit_predict(rows)
    mixtures = []
    for exclude, components in zip(exclude_folds, one_components, strict=True):
        kept = folds != exclude
        members = [kept & (labels == cluster) for cluster in range(n_clusters)]
        members = [member for member in members if np.count_nonzero(member) >= MIN_CLUSTER_PATCHES] or [kept]
        gaussians = [fit_gaussian(rows[member], reduction, variance) for member in members]
        mixtures.append(_stacked(gaussians, components))
    return mixtures


def _stacked(gaussians: Sequence[Gaussian], components: int) -> GaussianMixture:
    """Gaussians as one mixture, each whitening scaled by sqrt(components / its d) and padded to the
    largest d with zero columns (which add nothing to a distance)."""
    width = max(gaussian.n_components for gaussian in gaussians)
    channels = gaussians[0].mean.shape[0]
    whitening = np.zeros((len(gaussians), channels, width))
    for row, gaussian in zip(whitening, gaussians, strict=True):
        row[:, : gaussian.n_components] = gaussian.whitening * math.sqrt(components / gaussian.n_components)
    mean = np.stack([gaussian.mean for gaussian in gaussians])
    return GaussianMixture(mean, whitening, np.array([float(g.shrinkage) for g in gaussians]))


def mixture_distance_map(features: torch.Tensor, mean: torch.Tensor, whitening: torch.Tensor) -> torch.Tensor:
    """Feature maps (B, C, H, W) -> (B, H, W): at every position, the smallest distance to a mixture's
    Gaussians (mean (K, C), whitening (K, C, d)), as one product batched over the K. Each feature is
    centred on each mean before its whitening, as `gaussian.mahalanobis` does: x W - m W would cancel most
    of its float32 digits along the smallest components that OPCA keeps."""
    batch, channels, height, width = features.shape
    rows = features.permute(0, 2, 3, 1).reshape(1, -1, channels)
    whitened = torch.bmm(rows - mean[:, None, :], whitening)  # (K, B * H * W, d)
    return torch.linalg.vector_norm(whitened, dim=-1).amin(dim=0).reshape(batch, height, width)
