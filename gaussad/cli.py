"""Command-line tool: `gaussad fit`, `predict` and `evaluate`, thin layers over the library."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from gaussad import __version__
from gaussad.errors import GaussADError
from gaussad.evaluation import evaluate_category, find_categories, mean_metrics
from gaussad.features import PRECISIONS
from gaussad.fileio import replace_folder, write_text_atomic
from gaussad.gaussian import REDUCTIONS
from gaussad.heatmaps import colorize
from gaussad.images import find_images
from gaussad.model import LOCALIZATIONS, GaussAD

PREDICTIONS_FILE = "predictions.csv"


def _levels(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected level numbers such as 3,4,5") from None


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run-time options")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    group.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    group.add_argument("--workers", type=int, default=2, help="threads decoding images (default: 2)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    defaults = GaussAD()
    group = parser.add_argument_group("model options")
    group.add_argument(
        "--backbone", default=defaults.backbone, help="efficientnet_lite0/1/2 or any timm model"
    )
    group.add_argument("--weights", help="local weights file (.pth or .safetensors) for a timm backbone")
    group.add_argument("--levels", type=_levels, help="levels for the image score (default: the backbone's)")
    group.add_argument("--map-levels", type=_levels, help="levels for the anomaly map (default: tuned)")
    group.add_argument("--reduction", choices=REDUCTIONS, default=defaults.reduction)
    group.add_argument(
        "--variance", type=float, default=defaults.variance, help="variance share kept (opca 0.05, pca 0.95)"
    )
    group.add_argument("--localization", choices=LOCALIZATIONS, default=defaults.localization)
    group.add_argument("--image-size", type=int, help="square model input side (default: tuned)")
    group.add_argument(
        "--blur-sigma", type=float, default=defaults.blur_sigma, help="map blur, input px; 0 = off"
    )
    group.add_argument("--precision", choices=PRECISIONS, default=defaults.precision)


def _model_from_args(args: argparse.Namespace) -> GaussAD:
    return GaussAD(
        backbone=args.backbone,
        weights=args.weights,
        levels=args.levels,
        map_levels=args.map_levels,
        reduction=args.reduction,
        variance=args.variance,
        localization=args.localization,
        image_size=args.image_size,
        blur_sigma=args.blur_sigma,
        precision=args.precision,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
        progress=not args.quiet,
    )


def run_fit(args: argparse.Namespace) -> None:
    model = _model_from_args(args).fit(find_images(args.train_dir))
    model.save(args.output)
    print(f"fitted on {model.n_train_} images in {model.fit_seconds_:.1f} s; saved to {args.output}")


def output_names(inputs: Sequence[str]) -> list[tuple[Path, Path]]:
    """(image, output name) pairs: a folder's images are named by their path relative to that folder, a
    file by its name. Two inputs that would write the same name are an error, not a silent overwrite."""
    pairs: list[tuple[Path, Path]] = []
    for given in map(Path, inputs):
        base = given.parent if given.is_file() else given
        pairs += [(image, image.relative_to(base)) for image in find_images(given)]
    seen: dict[Path, Path] = {}
    for image, name in pairs:
        if name in seen:
            raise GaussADError(f"{image} and {seen[name]} would both be written as {name}")
        seen[name] = image
    return pairs


def run_predict(args: argparse.Namespace) -> None:
    model = GaussAD.load(args.model_dir, device=args.device, batch_size=args.batch_size, workers=args.workers)
    model.progress = not args.quiet
    pairs = output_names(args.paths)

    def write(folder: Path) -> None:
        rows = []
        low, high = np.inf, -np.inf
        named = iter(pairs)
        for _, scores, maps in model.iter_predict([image for image, _ in pairs]):
            for score, anomaly_map in zip(scores, maps, strict=True):
                image, name = next(named)
                target = folder / "maps" / name
                target.parent.mkdir(parents=True, exist_ok=True)
                np.save(target.with_suffix(".npy"), anomaly_map)
                low, high = min(low, float(anomaly_map.min())), max(high, float(anomaly_map.max()))
                rows.append((str(image), float(score), name))
        for _, _, name in rows:  # one colour scale for the whole run: needs every map's range first
            anomaly_map = np.load(folder / "maps" / name.with_suffix(".npy"))
            Image.fromarray(colorize(anomaly_map, low, high)).save(folder / "maps" / name.with_suffix(".png"))
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "score"])
        writer.writerows((path, f"{score:.6f}") for path, score, _ in rows)
        (folder / PREDICTIONS_FILE).write_text(buffer.getvalue())

    replace_folder(args.output, write, marker=PREDICTIONS_FILE)
    print(f"scored {len(pairs)} images; wrote {Path(args.output) / PREDICTIONS_FILE} and maps/")


def format_table(results, mean: dict[str, float]) -> str:
    header = f"{'category':<16}{'image AUROC':>12}{'pixel AUROC':>12}{'AUPRO':>8}{'train':>7}{'test':>6}"
    header += f"{'fit s':>8}{'test s':>8}{'img/s':>8}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.category:<16}{r.image_auroc:>12.4f}{r.pixel_auroc:>12.4f}{r.aupro:>8.4f}{r.n_train:>7}"
            f"{r.n_test:>6}{r.fit_seconds:>8.1f}{r.test_seconds:>8.1f}{r.test_images_per_second:>8.1f}"
        )
    if len(results) > 1:
        lines.append("-" * len(header))
        lines.append(
            f"{'mean':<16}{mean['image_auroc']:>12.4f}{mean['pixel_auroc']:>12.4f}{mean['aupro']:>8.4f}"
        )
    return "\n".join(lines)


def run_evaluate(args: argparse.Namespace) -> None:
    categories = find_categories(args.root, args.category)
    results = []
    for category in categories:
        result, _ = evaluate_category(lambda: _model_from_args(args), category, args.eval_size)
        results.append(result)
        if not args.quiet and len(categories) > 1:
            print(f"{category.name}: done", file=sys.stderr)
    mean = mean_metrics(results)
    print(format_table(results, mean))
    if args.json:
        config = {key: value for key, value in vars(args).items() if key not in ("handler", "json", "quiet")}
        document = {
            "config": json.loads(json.dumps(config, default=str)),
            "categories": [r.as_dict() for r in results],
            "mean": mean,
        }
        write_text_atomic(args.json, json.dumps(document, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gaussad", description="Visual anomaly detection with Gaussians.")
    parser.add_argument("--version", action="version", version=f"gaussad {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="fit a model on a folder of defect-free images")
    fit.add_argument("train_dir", help="folder of good images (searched recursively)")
    fit.add_argument("-o", "--output", required=True, help="model folder to write")
    _add_model_options(fit)
    _add_runtime_options(fit)
    fit.set_defaults(handler=run_fit)

    predict = commands.add_parser("predict", help="score images and write anomaly maps")
    predict.add_argument("model_dir", help="folder written by `gaussad fit`")
    predict.add_argument("paths", nargs="+", help="images or folders (searched recursively)")
    predict.add_argument("-o", "--output", required=True, help="folder for predictions.csv and maps/")
    _add_runtime_options(predict)
    predict.set_defaults(handler=run_predict)

    evaluate = commands.add_parser("evaluate", help="fit and evaluate on data in MVTec AD layout")
    evaluate.add_argument("root", help="a category folder, or a folder of categories")
    evaluate.add_argument("--category", nargs="+", help="only these categories")
    evaluate.add_argument("--eval-size", type=int, help="evaluate maps at N x N (default: ground-truth size)")
    evaluate.add_argument("--json", help="also write the results to this JSON file")
    _add_model_options(evaluate)
    _add_runtime_options(evaluate)
    evaluate.set_defaults(handler=run_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except GaussADError as error:
        print(f"gaussad: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gaussad: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
