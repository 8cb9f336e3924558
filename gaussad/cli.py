"""Command-line tool: `gaussad fit`, `predict` and `evaluate`, thin layers over the library."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gaussad import __version__, options
from gaussad.errors import GaussADError

# The library (torch, timm, matplotlib, scikit-learn) is imported inside the commands that use it:
# `gaussad --help` and argument errors answer at once instead of after seconds of imports.
if TYPE_CHECKING:
    from gaussad.calibration import Threshold
    from gaussad.evaluation import CategoryPredictions, CategoryResult
    from gaussad.model import GaussAD
    from gaussad.report import CategoryReport

PREDICTIONS_FILE = "predictions.csv"


def _levels(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected level numbers such as 3,4,5") from None


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run-time options")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    group.add_argument(
        "--batch-size",
        type=int,
        default=options.DEFAULT_BATCH_SIZE,
        help="images per forward pass (default: %(default)s)",
    )
    group.add_argument(
        "--workers",
        type=int,
        default=options.DEFAULT_WORKERS,
        help="threads decoding images (default: %(default)s)",
    )
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model options")
    group.add_argument(
        "--backbone", default=options.DEFAULT_BACKBONE, help="efficientnet_lite0/1/2 or any timm model"
    )
    group.add_argument("--weights", help="local weights file (.pth or .safetensors) for a timm backbone")
    group.add_argument("--levels", type=_levels, help="levels for the image score (default: the backbone's)")
    group.add_argument("--map-levels", type=_levels, help="levels for the anomaly map (default: tuned)")
    group.add_argument(
        "--position-levels",
        type=_levels,
        help="hybrid localization: levels stacked for the per-position Gaussian (default: tuned)",
    )
    group.add_argument("--reduction", choices=options.REDUCTIONS, default=options.DEFAULT_REDUCTION)
    group.add_argument(
        "--variance",
        type=float,
        default=options.DEFAULT_VARIANCE,
        help="variance share kept (opca 0.05, pca 0.95)",
    )
    group.add_argument("--localization", choices=options.LOCALIZATIONS, default=options.DEFAULT_LOCALIZATION)
    group.add_argument("--image-size", type=int, help="square model input side (default: tuned)")
    group.add_argument(
        "--blur-sigma", type=float, default=options.DEFAULT_BLUR_SIGMA, help="map blur, input px; 0 = off"
    )
    group.add_argument(
        "--image-grid",
        type=int,
        default=options.DEFAULT_IMAGE_GRID,
        help="image score: features averaged per cell of an N x N grid; 1 = global pooling (paper)",
    )
    group.add_argument("--precision", choices=options.PRECISIONS, default=options.DEFAULT_PRECISION)
    group.add_argument(
        "--folds", type=int, default=options.DEFAULT_FOLDS, help="folds for label-free thresholds; 0 = none"
    )
    group.add_argument(
        "--max-false-alarm-rate",
        type=float,
        default=options.DEFAULT_FALSE_ALARM_RATE,
        help="target share of good images flagged, for the label-free thresholds (default: 0.01)",
    )


def _model_from_args(args: argparse.Namespace) -> GaussAD:
    from gaussad.model import GaussAD

    return GaussAD(
        backbone=args.backbone,
        weights=args.weights,
        levels=args.levels,
        map_levels=args.map_levels,
        position_levels=args.position_levels,
        reduction=args.reduction,
        variance=args.variance,
        localization=args.localization,
        image_size=args.image_size,
        blur_sigma=args.blur_sigma,
        image_grid=args.image_grid,
        precision=args.precision,
        folds=args.folds,
        max_false_alarm_rate=args.max_false_alarm_rate,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
        progress=not args.quiet,
    )


def run_fit(args: argparse.Namespace) -> None:
    from gaussad.images import find_images

    model = _model_from_args(args).fit(find_images(args.train_dir))
    model.save(args.output)
    print(f"fitted on {model.n_train_} images in {model.fit_seconds_:.1f} s; saved to {args.output}")


def output_names(inputs: Sequence[str]) -> list[tuple[Path, Path]]:
    """(image, output name) pairs: a folder's images are named by their path relative to that folder, a
    file by its name. Two inputs that would write the same name are an error, not a silent overwrite."""
    from gaussad.images import find_images

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
    import numpy as np
    from PIL import Image

    from gaussad.fileio import replace_folder
    from gaussad.heatmaps import colorize, overlay
    from gaussad.images import read_image
    from gaussad.model import GaussAD

    model = GaussAD.load(args.model_dir, device=args.device, batch_size=args.batch_size, workers=args.workers)
    model.progress = not args.quiet
    image_threshold, pixel_threshold = model.image_threshold_, model.pixel_threshold_
    pairs = output_names(args.paths)

    def save_pictures(folder: Path, image: Path, name: Path, anomaly_map: np.ndarray, scale) -> None:
        heatmap = folder / "maps" / name.with_suffix(".png")
        Image.fromarray(colorize(anomaly_map, *scale)).save(heatmap)
        mask = anomaly_map >= pixel_threshold.value if pixel_threshold else None
        if mask is not None:
            target = folder / "masks" / name.with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((mask * 255).astype(np.uint8)).save(target)
        if args.overlays:
            target = folder / "overlays" / name.with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            picture = overlay(np.asarray(read_image(image)), anomaly_map, *scale, mask=mask)
            Image.fromarray(picture).save(target)

    rows: list[tuple[Path, float, Path]] = []

    def write(folder: Path) -> None:
        # One colour scale for the whole run: the model's own (typical normal value to twice the threshold)
        # when it is calibrated, else the range of all maps of this run, known only at the end.
        scale = map_scale(pixel_threshold) if pixel_threshold else None
        low, high = np.inf, -np.inf
        named = iter(pairs)
        for _, scores, maps in model.iter_predict([image for image, _ in pairs]):
            for score, anomaly_map in zip(scores, maps, strict=True):
                image, name = next(named)
                target = folder / "maps" / name
                target.parent.mkdir(parents=True, exist_ok=True)
                np.save(target.with_suffix(".npy"), anomaly_map)
                low, high = min(low, float(anomaly_map.min())), max(high, float(anomaly_map.max()))
                if scale:
                    save_pictures(folder, image, name, anomaly_map, scale)
                rows.append((image, float(score), name))
        if not scale:
            for image, _, name in rows:
                save_pictures(
                    folder, image, name, np.load(folder / "maps" / name.with_suffix(".npy")), (low, high)
                )
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "score", "normalized_score", "is_anomalous"])
        for image, score, _ in rows:
            decision = ["", ""]
            if image_threshold:
                normalized = float(image_threshold.normalize(score))
                decision = [f"{normalized:.4f}", str(int(score >= image_threshold.value))]
            writer.writerow([str(image), f"{score:.6f}", *decision])
        (folder / PREDICTIONS_FILE).write_text(buffer.getvalue())

    replace_folder(args.output, write, marker=PREDICTIONS_FILE)
    summary = f"scored {len(pairs)} images"
    if image_threshold:
        flagged = sum(score >= image_threshold.value for _, score, _ in rows)
        summary += f", {flagged} anomalous at threshold {image_threshold.value:.4g}"
    print(f"{summary}; wrote {Path(args.output) / PREDICTIONS_FILE}")


def map_scale(threshold: Threshold) -> tuple[float, float]:
    """Colour range for maps: the typical normal value is dark, the threshold mid-scale."""
    return threshold.normal_level, 2.0 * threshold.value - threshold.normal_level


def format_table(results: list[CategoryResult], mean: dict[str, float]) -> str:
    """The results table; false-alarm and miss rates are at the model's label-free image threshold."""
    header = f"{'category':<16}{'image AUROC':>12}{'pixel AUROC':>12}{'AUPRO':>8}{'FAR':>7}{'miss':>7}"
    header += f"{'train':>7}{'test':>6}{'fit s':>8}{'test s':>8}{'img/s':>8}"
    lines = [header, "-" * len(header)]
    for r in results:
        rates = "".join(
            f"{'-' if rate is None else f'{rate:.3f}':>7}" for rate in (r.false_alarm_rate, r.miss_rate)
        )
        lines.append(
            f"{r.category:<16}{r.image_auroc:>12.4f}{r.pixel_auroc:>12.4f}{r.aupro:>8.4f}{rates}{r.n_train:>7}"
            f"{r.n_test:>6}{r.fit_seconds:>8.1f}{r.test_seconds:>8.1f}{r.test_images_per_second:>8.1f}"
        )
    if len(results) > 1:
        lines.append("-" * len(header))
        lines.append(
            f"{'mean':<16}{mean['image_auroc']:>12.4f}{mean['pixel_auroc']:>12.4f}{mean['aupro']:>8.4f}"
        )
    return "\n".join(lines)


def _run_config(args: argparse.Namespace) -> dict:
    skip = ("handler", "json", "quiet", "report", "output", "save_results")
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in skip}, default=str))


def _evaluate(args: argparse.Namespace) -> tuple[list[CategoryResult], list[CategoryPredictions]]:
    from gaussad.evaluation import evaluate_category, find_categories

    results, predictions = [], []
    for category in find_categories(args.root, args.category):
        result, predicted = evaluate_category(lambda: _model_from_args(args), category, args.eval_size)
        results.append(result)
        predictions.append(predicted)
    return results, predictions


def _outcomes(results: list[CategoryResult], predictions: list[CategoryPredictions]) -> list[CategoryReport]:
    """Each category's evaluation with its model's thresholds, as reports and saved results take them."""
    from gaussad.report import CategoryReport

    outcomes = []
    for result, predicted in zip(results, predictions, strict=True):
        model = predicted.model
        if model.image_threshold_ is None or model.pixel_threshold_ is None:
            raise GaussADError("reports and saved results need thresholds: fit with --folds 2 or more")
        outcomes.append(
            CategoryReport(
                result,
                predicted,
                image_threshold=model.image_threshold_.value,
                pixel_threshold=model.pixel_threshold_.value,
                threshold_source=f"{model.image_threshold_.method}: {model.image_threshold_.source}",
            )
        )
    return outcomes


def _model_info(model: GaussAD) -> dict:
    return {
        "backbone": model.backbone_.name,
        "weights": f"{model.backbone_.weights_source} (SHA-256 {model.backbone_.weights_sha256})",
        "input size": model.image_size_,
        "levels (image score)": list(model.levels_),
        "levels (map)": list(model.map_levels_),
        "levels (position)": list(model.position_levels_),
        "components per level": {
            f"{r['role']} {r['level']}": r["components"] for r in model.describe_levels()
        },
    }


def _report(path: str, config: dict, model_info: dict, outcomes: list[CategoryReport]) -> None:
    from gaussad.report import ReportData, write_report

    title = f"gaussad evaluation: {', '.join(o.result.category for o in outcomes)}"
    write_report(path, ReportData(title, config, model_info, outcomes))
    print(f"report: {path}")


def run_evaluate(args: argparse.Namespace) -> None:
    from gaussad.evaluation import mean_metrics
    from gaussad.fileio import write_text_atomic
    from gaussad.results import save_results

    results, predictions = _evaluate(args)
    mean = mean_metrics(results)
    print(format_table(results, mean))
    config = _run_config(args)
    if args.json:
        document = {"config": config, "categories": [r.as_dict() for r in results], "mean": mean}
        write_text_atomic(args.json, json.dumps(document, indent=2) + "\n")
    if args.report or args.save_results:
        outcomes = _outcomes(results, predictions)
        model_info = _model_info(predictions[0].model)
        if args.save_results:
            save_results(args.save_results, config, model_info, outcomes)
            print(f"results: {args.save_results}")
        if args.report:
            _report(args.report, config, model_info, outcomes)


def run_report(args: argparse.Namespace) -> None:
    from gaussad.evaluation import mean_metrics
    from gaussad.results import is_results_folder, load_results

    if is_results_folder(args.root):
        _report(args.output, *load_results(args.root))
        return
    results, predictions = _evaluate(args)
    print(format_table(results, mean_metrics(results)))
    _report(
        args.output, _run_config(args), _model_info(predictions[0].model), _outcomes(results, predictions)
    )


def run_calibrate(args: argparse.Namespace) -> None:
    from gaussad.evaluation import calibrate_on_labeled, find_categories
    from gaussad.model import GaussAD

    model = GaussAD.load(args.model_dir, device=args.device, batch_size=args.batch_size, workers=args.workers)
    model.progress = not args.quiet
    if args.val_root:
        category = find_categories(args.val_root)[0]
        image, pixel = calibrate_on_labeled(model, category, args.max_false_alarm_rate)
    elif args.max_false_alarm_rate is not None:
        model.max_false_alarm_rate = args.max_false_alarm_rate
        image, pixel = model.label_free_thresholds()
    else:
        image, pixel = model.image_threshold_, model.pixel_threshold_
    if args.image_threshold is not None:
        image = manual_threshold(args.image_threshold, image, "image")
    if args.pixel_threshold is not None:
        pixel = manual_threshold(args.pixel_threshold, pixel, "pixel")
    if image is None and pixel is None:
        raise GaussADError(
            "nothing to calibrate: give VAL_ROOT, --max-false-alarm-rate or a manual threshold"
        )
    model.image_threshold_, model.pixel_threshold_ = image, pixel
    model.save(args.model_dir)
    print(describe_thresholds(model))


def manual_threshold(value: float, previous: Threshold | None, kind: str) -> Threshold:
    from gaussad.calibration import Threshold

    normal_level = previous.normal_level if previous else 0.0
    if value <= normal_level:
        raise GaussADError(
            f"{kind} threshold {value}: must be above the typical normal value {normal_level:.4g}"
        )
    return Threshold(value, normal_level, "manual", f"{kind} threshold set by hand")


def describe_thresholds(model: GaussAD) -> str:
    lines = []
    for kind, threshold in (("image", model.image_threshold_), ("pixel", model.pixel_threshold_)):
        if threshold is None:
            lines.append(f"{kind} threshold: none (fit with --folds 0; use `gaussad calibrate`)")
        else:
            lines.append(f"{kind} threshold: {threshold.value:.6g} ({threshold.method}: {threshold.source})")
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> None:
    from gaussad.model import GaussAD
    from gaussad.persistence import FORMAT_VERSION

    model = GaussAD.load(args.model_dir, device="cpu")
    backbone = model.backbone_
    print(f"model: {Path(args.model_dir)} (format version {FORMAT_VERSION})")
    print(f"backbone: {backbone.name} ({backbone.weights_source}, SHA-256 {backbone.weights_sha256})")
    print(f"input: {model.image_size_} px; trained on {model.n_train_} images")
    print(
        f"reduction: {model.reduction} {model.variance}; localization: {model.localization}; "
        f"blur sigma: {model.blur_sigma}; image grid: {model.image_grid} x {model.image_grid}"
    )
    for row in model.describe_levels():
        print(
            f"  {row['role']:<8} level {row['level']}: {row['components']} of {row['channels']} components, "
            f"shrinkage {row['shrinkage']:.4f}"
        )
    print(describe_thresholds(model))


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
    predict.add_argument(
        "--overlays", action="store_true", help="also write overlays/: heatmap blended over each image"
    )
    _add_runtime_options(predict)
    predict.set_defaults(handler=run_predict)

    calibrate = commands.add_parser("calibrate", help="set a model's decision thresholds")
    calibrate.add_argument("model_dir", help="folder written by `gaussad fit` (updated in place)")
    calibrate.add_argument(
        "val_root", nargs="?", help="labelled data in MVTec layout: thresholds at the F1-optimal points"
    )
    calibrate.add_argument(
        "--max-false-alarm-rate",
        type=float,
        help="with VAL_ROOT: the rate on its good images; without: re-derive the label-free thresholds",
    )
    calibrate.add_argument("--image-threshold", type=float, help="manual image threshold (raw score)")
    calibrate.add_argument("--pixel-threshold", type=float, help="manual pixel threshold (raw map value)")
    _add_runtime_options(calibrate)
    calibrate.set_defaults(handler=run_calibrate)

    info = commands.add_parser("info", help="describe a model: backbone, levels, thresholds")
    info.add_argument("model_dir")
    info.set_defaults(handler=run_info)

    evaluate = commands.add_parser("evaluate", help="fit and evaluate on data in MVTec AD layout")
    evaluate.add_argument("root", help="a category folder, or a folder of categories")
    evaluate.add_argument("--category", nargs="+", help="only these categories")
    evaluate.add_argument("--eval-size", type=int, help="evaluate maps at N x N (default: ground-truth size)")
    evaluate.add_argument("--json", help="also write the results to this JSON file")
    evaluate.add_argument("--report", help="also write a self-contained HTML report to this file")
    evaluate.add_argument(
        "--save-results", help="also save results to this folder, for `gaussad report FOLDER` later"
    )
    _add_model_options(evaluate)
    _add_runtime_options(evaluate)
    evaluate.set_defaults(handler=run_evaluate)

    report = commands.add_parser("report", help="evaluate and write a self-contained HTML report")
    report.add_argument(
        "root",
        help="a category folder or a folder of categories in MVTec AD layout (evaluated first), "
        "or a folder written by `evaluate --save-results`",
    )
    report.add_argument("-o", "--output", required=True, help="the HTML file to write")
    report.add_argument("--category", nargs="+", help="only these categories")
    report.add_argument("--eval-size", type=int, help="evaluate maps at N x N (default: ground-truth size)")
    _add_model_options(report)
    _add_runtime_options(report)
    report.set_defaults(handler=run_report)
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
