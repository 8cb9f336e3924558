r"""Shared maps from other Gaussians than the paper's one per level: a mixture, and neighbourhood features.

    python benchmarks/tune_shared_gaussian.py ../shared/datasets/mvtec_ad/bottle \
        ../shared/datasets/magnetic_tile --out benchmarks/results/tune_shared_gaussian.md

A shared map models every position of a level with one Gaussian. Where a part lies on a background, or
has faces that look unlike each other, normal patches form several clusters, and one Gaussian spans the
empty space between them; PatchCore instead compares each patch with its nearest normal ones, after
averaging every feature over its 3 x 3 neighbourhood ("locally aware" features). Two ways to bring either
into a Gaussian model, per map level (3-5, Lite0 at 224 px, blur 2, equal level weights as the model):

- `mixture K`: the training patches cut into K clusters by k-means (on a sample of 50,000), one reduced
  Ledoit-Wolf Gaussian per cluster (OPCA 5%, as the model), a position's distance the smallest of the K
  (each cluster's distance per component, on the one-Gaussian level's scale);
- `neighbourhood 3 x 3`: every position's features averaged over its 3 x 3 neighbourhood (stride 1, the
  border over the positions inside) before the one Gaussian, in training and test alike.

`one Gaussian` is the model's shared map. Each variant is also measured as the hybrid map's shared half
(its geometric mean with the model's per-position map of levels 3 and 5), where `one Gaussian` is the
model's hybrid map. Pixel AUROC and AUPRO at 256 x 256.

The last table asks whether the auto localization would still choose as it does with a mixture of 16 in
hybrid maps: its proxy (AUPRO on patches pasted into held-out good images, `gaussad.selection`), emulated
with one held-out fifth of the training images in place of the fit's fold models.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from gaussad.evaluation import read_mask
from gaussad.features import BatchRunner, prepare
from gaussad.gaussian import Gaussian, fit_gaussian
from gaussad.images import collect_images
from gaussad.layout import list_test_images, training_images
from gaussad.maps import combine_maps, resize_map
from gaussad.metrics import pixel_metrics
from gaussad.model import GaussAD
from gaussad.selection import LOCALIZATION_KIND, MAX_SYNTHETIC_IMAGES, choose, localization_evidence
from gaussad.synthetic import synthetic_defects
from gaussad.tuning import cpu_tuning

MAP_LEVELS = (3, 4, 5)
MIXTURES = (2, 4, 8, 16)
CLUSTER_SAMPLE = 50_000
EVAL_SIZE = 256
BASELINE = "one Gaussian"
PROXY_MIXTURE = 16  # the mixture whose choice by the patch proxy is emulated
FORMS = ("shared", "hybrid")  # the variant's map alone, or as the hybrid map's shared half
STRESS_VARIANTS = Path.home() / ".cache" / "gaussad" / "stress"  # benchmarks/stress_variants.py's


def shown(argument: str) -> str:
    """A command-line argument as the results show it: the stress variants' folder as `$S`."""
    return argument.replace(str(STRESS_VARIANTS), "$S")


def level_features(
    model: GaussAD, images: list, with_positions: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Each map level's features (N, C, H, W) of the images and, `with_positions` (a hybrid model), their
    per-position maps (N, h, w), from one pass of the fitted model's backbone."""
    scorer = model.scorer_

    def parts(batch: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        features = scorer.features(batch)
        levels = [features[index] for index in scorer.map_indices]
        if not with_positions:
            return levels, None
        stacked = scorer.stack_position([features[index] for index in scorer.position_indices])
        return levels, scorer.map_head.position_map(stacked)

    runner = BatchRunner(parts, model.backbone_.preprocessing, model.input_size_, model.device_)
    levels: list[list[torch.Tensor]] = [[] for _ in scorer.map_indices]
    positions: list[torch.Tensor] = []
    for batch in runner.batches(collect_images(images)):
        batch_levels, batch_positions = batch.outputs
        for store, level in zip(levels, batch_levels, strict=True):
            store.append(level.cpu())
        if batch_positions is not None:
            positions.append(batch_positions.cpu())
    return [torch.cat(store) for store in levels], torch.cat(positions) if positions else None


def patches(features: torch.Tensor) -> np.ndarray:
    """Feature maps (N, C, H, W) as float64 rows (N * H * W, C)."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).numpy().astype(np.float64)


def neighbourhood(features: torch.Tensor) -> torch.Tensor:
    """Every position's features averaged over its 3 x 3 neighbourhood."""
    return F.avg_pool2d(features, 3, stride=1, padding=1, count_include_pad=False)


def mixture_distances(train: np.ndarray, test: np.ndarray, clusters: int, one: Gaussian) -> np.ndarray:
    """Per test patch, the smallest per-component distance to the Gaussians of `clusters` k-means clusters
    of the training patches, on the scale of the one Gaussian's distances."""
    sample = np.random.default_rng(0).choice(len(train), min(len(train), CLUSTER_SAMPLE), replace=False)
    labels = KMeans(clusters, n_init=2, random_state=0).fit(train[sample]).predict(train)
    nearest = np.full(len(test), np.inf)
    for cluster in range(clusters):
        gaussian = fit_gaussian(train[labels == cluster], "opca", 0.05)
        nearest = np.minimum(nearest, gaussian.component_distances(test))
    return nearest * np.sqrt(one.n_components)


def variants() -> dict[str, Callable[[torch.Tensor, torch.Tensor], np.ndarray]]:
    """Each variant: a level's (train, test) features -> the test patches' distances."""

    def one_gaussian(train: torch.Tensor, test: torch.Tensor) -> np.ndarray:
        gaussian = fit_gaussian(patches(train), "opca", 0.05)
        return gaussian.component_distances(patches(test)) * np.sqrt(gaussian.n_components)

    def mixture(clusters: int) -> Callable[[torch.Tensor, torch.Tensor], np.ndarray]:
        def distances(train: torch.Tensor, test: torch.Tensor) -> np.ndarray:
            rows = patches(train)
            return mixture_distances(rows, patches(test), clusters, fit_gaussian(rows, "opca", 0.05))

        return distances

    found = {BASELINE: one_gaussian}
    found |= {f"mixture {clusters}": mixture(clusters) for clusters in MIXTURES}
    found["neighbourhood 3 x 3"] = lambda train, test: one_gaussian(neighbourhood(train), neighbourhood(test))
    return found


def run(category: Path, done: set[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """Pixel AUROC and AUPRO of every variant's maps not `done` on one data set, shared and hybrid (the
    variant's map in place of the hybrid map's shared half, the per-position half the model's)."""
    tests = list_test_images(category)
    model = GaussAD(localization="hybrid", map_levels=MAP_LEVELS, image_score="pooled", folds=0, crop="none")
    model.fit(training_images(category))
    train_levels, _ = level_features(model, training_images(category))
    test_levels, position_maps = level_features(model, [test.path for test in tests], with_positions=True)
    masks = [read_mask(test, (EVAL_SIZE, EVAL_SIZE)) for test in tests]
    results: dict[str, dict[str, tuple[float, float]]] = {form: {} for form in FORMS}
    for name, distances in variants().items():
        if name in done:
            continue
        level_maps = [
            torch.from_numpy(distances(train, test).reshape(test.shape[0], *test.shape[2:])).float()
            for train, test in zip(train_levels, test_levels, strict=True)
        ]
        for form, position in zip(FORMS, (None, position_maps), strict=True):
            maps = combine_maps(level_maps, position, model.input_size_, model.blur_sigma)
            pixel_auroc, aupro = pixel_metrics(
                masks, [resize_map(m, (EVAL_SIZE, EVAL_SIZE)).numpy() for m in maps]
            )
            results[form][name] = (pixel_auroc, aupro)
            print(
                f"{category.name}: {form}, {name}: pixel AUROC {pixel_auroc:.4f}, AUPRO {aupro:.4f}",
                flush=True,
            )
    return results


def proxy(category: Path) -> dict[str, float]:
    """The auto localization's proxy (AUPRO on pasted patches) of shared maps, hybrid maps and hybrid maps
    with a mixture of `PROXY_MIXTURE` as their shared half, emulated with one held-out split: a hybrid fit on
    four fifths of the training images, the patches pasted (as the fit pastes them) into the other fifth,
    every fifth image, at most `MAX_SYNTHETIC_IMAGES`."""
    images = training_images(category)
    held_out, kept = images[::5][:MAX_SYNTHETIC_IMAGES], [image for i, image in enumerate(images) if i % 5]
    model = GaussAD(
        localization="hybrid", map_levels=MAP_LEVELS, image_score="pooled", folds=0, crop="none"
    ).fit(kept)
    pixels = np.stack([prepare(image, model.input_size_)[0] for image in held_out])
    defective, masks, kinds = synthetic_defects(pixels, pixels)
    patches_only = np.array(kinds) == LOCALIZATION_KIND
    defective, masks = list(defective[patches_only]), masks[patches_only]
    train_levels, _ = level_features(model, kept)
    test_levels, position_maps = level_features(model, defective, with_positions=True)
    maps = {}
    for name, position in (
        (BASELINE, None),
        (BASELINE, position_maps),
        (f"mixture {PROXY_MIXTURE}", position_maps),
    ):
        distances = variants()[name]
        level_maps = [
            torch.from_numpy(distances(train, test).reshape(test.shape[0], *test.shape[2:])).float()
            for train, test in zip(train_levels, test_levels, strict=True)
        ]
        form = "shared" if position is None else "hybrid"
        maps[f"{form}, {name}"] = combine_maps(
            level_maps, position, model.input_size_, model.blur_sigma
        ).numpy()
    evidence = localization_evidence(masks, maps, [LOCALIZATION_KIND] * len(masks))
    print(
        f"{category.name}: proxy " + ", ".join(f"{k} {v['proxy']:.4f}" for k, v in evidence.items()),
        flush=True,
    )
    return {name: row["proxy"] for name, row in evidence.items()}


def proxy_table(results: dict[str, dict]) -> list[str]:
    """Per data set, the emulated proxy of each map and what the auto localization's rule would choose
    between shared maps and hybrid maps, today's and with the mixture."""
    mixed = f"hybrid, mixture {PROXY_MIXTURE}"
    lines = [
        "## The patch proxy",
        "",
        "AUPRO on pasted patches (`proxy` in the script): shared maps, hybrid maps, hybrid maps with a "
        f"mixture of {PROXY_MIXTURE} as their shared half, and the auto localization's choice (shared maps "
        "unless hybrid ones lead by the margin) between shared and hybrid maps, today's and with the "
        "mixture.",
        "",
        f"| data set | shared | hybrid | {mixed} | chosen | chosen with the mixture |",
        "|---|---|---|---|---|---|",
    ]
    for dataset, measured in results.items():
        values = measured["proxy"]
        shared, hybrid = f"shared, {BASELINE}", f"hybrid, {BASELINE}"
        today = choose({"shared": {"proxy": values[shared]}, "hybrid": {"proxy": values[hybrid]}})
        mixture = choose({"shared": {"proxy": values[shared]}, "hybrid": {"proxy": values[mixed]}})
        lines.append(
            f"| {dataset} | {values[shared]:.4f} | {values[hybrid]:.4f} | {values[mixed]:.4f} | {today} | "
            f"{mixture} |"
        )
    return [*lines, ""]


def table(results: dict[str, dict[str, dict[str, tuple[float, float]]]], form: str) -> list[str]:
    """Per data set, each variant's pixel AUROC / AUPRO in one form; then the means and the largest loss to
    the one Gaussian on any set."""
    by_set = {dataset: forms[form] for dataset, forms in results.items()}
    names = list(next(iter(by_set.values())))
    lines = [f"## {form.capitalize()} maps", ""]
    lines += ["| data set | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for dataset, by_name in by_set.items():
        cells = [f"{by_name[name][0]:.4f} / {by_name[name][1]:.4f}" for name in names]
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    lines += ["", "| variant | mean pixel AUROC | mean AUPRO | largest AUPRO loss | sets with lower AUPRO |"]
    lines.append("|---|---|---|---|---|")
    for name in names:
        values = np.array([by_name[name] for by_name in by_set.values()])
        baseline = np.array([by_name[BASELINE] for by_name in by_set.values()])
        losses = baseline[:, 1] - values[:, 1]
        lines.append(
            f"| {name} | {values[:, 0].mean():.4f} | {values[:, 1].mean():.4f} | {losses.max():+.4f} | "
            f"{int((losses > 0).sum())} of {len(values)} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT (.md) and OUT.json")
    args = parser.parse_args()
    json_path = args.out.with_suffix(".json")
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    with cpu_tuning():
        for category in args.categories:
            # A rerun measures only what the JSON lacks: new data sets, new variants.
            measured = results.setdefault(category.name, {form: {} for form in FORMS})
            if set(variants()) - set(measured["hybrid"]):
                for form, by_name in run(category, set(measured["hybrid"])).items():
                    measured[form] = {
                        name: (by_name | measured[form])[name]
                        for name in variants()
                        if name in by_name | measured[form]
                    }
            if "proxy" not in measured:
                measured["proxy"] = proxy(category)
            json_path.write_text(json.dumps(results, indent=1) + "\n")
    command = " ".join(["python", "benchmarks/tune_shared_gaussian.py", *map(shown, sys.argv[1:])])
    head = [
        "# Shared maps: one Gaussian per level, a mixture, or neighbourhood features",
        "",
        "Command (after `python benchmarks/stress_variants.py ../shared/datasets/mvtec_ad/bottle "
        f"../shared/datasets/magnetic_tile`; `S=~/.cache/gaussad/stress`): `{command}`",
        "",
        "Pixel AUROC / AUPRO of the maps (levels 3-5, Lite0 at 224 px, blur 2, 256 x 256 masks), shared and "
        "hybrid (each variant as the hybrid map's shared half); `benchmarks/tune_shared_gaussian.py` says "
        "what each variant is.",
        "",
    ]
    tables = [line for form in FORMS for line in table(results, form)] + proxy_table(results)
    args.out.with_suffix(".md").write_text("\n".join(head + tables))


if __name__ == "__main__":
    main()
