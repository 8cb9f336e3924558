"""Command-line tool: `gaussad fit`, `predict`, `evaluate`, `calibrate`, `info` and `report`.

It parses and prints; what the commands decide and write lives in the library (decisions, heatmaps,
evaluation, report, results). Each command runs inside `cpu_tuning()`, the process-wide CPU settings a
library user does not get unasked.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gaussad import __version__
from gaussad.config import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS, MODEL_OPTIONS, ModelConfig
from gaussad.errors import GaussADError

# The library (torch, timm, matplotlib, scikit-learn) is imported inside the commands that use it:
# `gaussad --help` and argument errors answer at once instead of after seconds of imports.
if TYPE_CHECKING:
    from gaussad.decisions import Decision
    from gaussad.evaluation import CategoryEvaluation, CategoryResult
    from gaussad.model import GaussAD
    from gaussad.report import CategoryReport


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
        default=DEFAULT_BATCH_SIZE,
        help="images per forward pass (default: %(default)s)",
    )
    group.add_argument(
        "--workers", type=int, default=DEFAULT_WORKERS, help="threads decoding images (default: %(default)s)"
    )
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _option_type(name: str, spec: dict[str, Any]) -> Any:
    """How the CLI parses a model option: levels lists, file paths, or the type of the field."""
    if spec["kind"] == "levels":
        return _levels
    if spec["kind"] == "path" or spec["choices"]:
        return str
    hint = next(f.type for f in fields(ModelConfig) if f.name == name)  # text, e.g. "int | None"
    for kind in (int, float, str):
        if kind.__name__ in hint.split(" | "):
            return kind
    raise TypeError(f"model option {name}: no command-line type for {hint}")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """One flag per field of ModelConfig, with its help, default and choices stated there."""
    group = parser.add_argument_group("model options")
    for name, spec in MODEL_OPTIONS.items():
        default = spec["default"]
        help_text = spec["help"] if default is None else f"{spec['help']} (default: %(default)s)"
        group.add_argument(
            "--" + name.replace("_", "-"),
            type=_option_type(name, spec),
            default=default,
            choices=spec["choices"] or None,
            metavar="FILE" if spec["kind"] == "path" else None,
            help=help_text,
        )


def _model_from_args(args: argparse.Namespace) -> GaussAD:
    from gaussad.model import GaussAD

    return GaussAD(
        **{name: getattr(args, name) for name in MODEL_OPTIONS},
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=not args.quiet,
    )


def _load_model(args: argparse.Namespace) -> GaussAD:
    from gaussad.model import GaussAD

    return GaussAD.load(
        args.model_dir,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=not args.quiet,
    )


def run_fit(args: argparse.Namespace) -> None:
    from gaussad.images import find_images

    model = _model_from_args(args).fit(find_images(args.train_dir))
    model.save(args.output)
    print(f"fitted on {model.n_train_} images in {model.fit_seconds_:.1f} s; saved to {args.output}")


def run_predict(args: argparse.Namespace) -> None:
    import numpy as np

    from gaussad.decisions import (
        PREDICTIONS_FILE,
        decide_all,
        defect_mask,
        map_scale,
        output_names,
        output_path,
        predictions_csv,
    )
    from gaussad.fileio import replace_folder
    from gaussad.heatmaps import write_pictures

    model = _load_model(args)
    image_threshold, pixel_threshold = model.image_threshold_, model.pixel_threshold_
    pairs = output_names(args.paths)
    decisions: list[Decision] = []

    def pictures(folder: Path, image: Path, name: Path, anomaly_map: np.ndarray, scale) -> None:
        mask = defect_mask(anomaly_map, pixel_threshold)
        write_pictures(folder, name, anomaly_map, scale, mask, image if args.overlays else None)

    def write(folder: Path) -> None:
        # A calibrated model's colour scale is known now; an uncalibrated one's is the range of all the
        # run's maps, so its pictures are drawn at the end from the saved maps.
        scale = map_scale(pixel_threshold) if pixel_threshold else None
        low, high, scores = np.inf, -np.inf, []
        for batch in model.iter_predict([image for image, _ in pairs]):
            for index, anomaly_map in enumerate(batch.maps, start=batch.start):
                image, name = pairs[index]
                target = output_path(folder, "maps", name, ".npy")
                target.parent.mkdir(parents=True, exist_ok=True)
                np.save(target, anomaly_map)
                low, high = min(low, float(anomaly_map.min())), max(high, float(anomaly_map.max()))
                if scale:
                    pictures(folder, image, name, anomaly_map, scale)
            scores.extend(batch.scores.tolist())
        if not scale:
            scale = map_scale(None, (low, high))
            for image, name in pairs:
                pictures(folder, image, name, np.load(output_path(folder, "maps", name, ".npy")), scale)
        decisions.extend(decide_all(scores, image_threshold))
        (folder / PREDICTIONS_FILE).write_text(predictions_csv([image for image, _ in pairs], decisions))

    replace_folder(args.output, write, marker=PREDICTIONS_FILE)
    summary = f"scored {len(pairs)} images"
    if image_threshold:
        flagged = sum(decision.is_anomalous for decision in decisions)
        summary += f", {flagged} anomalous at threshold {image_threshold.value:.4g}"
    print(f"{summary}; wrote {Path(args.output) / PREDICTIONS_FILE}")


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


def _evaluate(args: argparse.Namespace, keep_maps: bool) -> list[CategoryEvaluation]:
    """Evaluate every category asked for, printing the table; maps are kept only for reports."""
    from gaussad.evaluation import evaluate_category, find_categories, mean_metrics

    if keep_maps and args.folds == 0:  # said before the fits rather than after them
        raise GaussADError("reports and saved results need thresholds: fit with --folds 2 or more")
    evaluations = [
        evaluate_category(lambda: _model_from_args(args), category, args.eval_size, keep_maps=keep_maps)
        for category in find_categories(args.root, args.category)
    ]
    results = [evaluation.result for evaluation in evaluations]
    print(format_table(results, mean_metrics(results)))
    return evaluations


def _category_reports(evaluations: list[CategoryEvaluation]) -> list[CategoryReport]:
    from gaussad.report import category_report

    return [category_report(evaluation) for evaluation in evaluations]


def _report(path: str, config: dict, model_info: dict, outcomes: list[CategoryReport]) -> None:
    from gaussad.report import ReportData, write_report

    title = f"gaussad evaluation: {', '.join(o.result.category for o in outcomes)}"
    write_report(path, ReportData(title, config, model_info, outcomes))
    print(f"report: {path}")


def run_evaluate(args: argparse.Namespace) -> None:
    from gaussad.evaluation import mean_metrics
    from gaussad.fileio import write_text_atomic
    from gaussad.results import save_results

    evaluations = _evaluate(args, keep_maps=bool(args.report or args.save_results))
    results = [evaluation.result for evaluation in evaluations]
    config = _run_config(args)
    if args.json:
        document = {
            "config": config,
            "categories": [r.as_dict() for r in results],
            "mean": mean_metrics(results),
        }
        write_text_atomic(args.json, json.dumps(document, indent=2) + "\n")
    if args.report or args.save_results:
        outcomes = _category_reports(evaluations)
        model_info = evaluations[0].model_info
        if args.save_results:
            save_results(args.save_results, config, model_info, outcomes)
            print(f"results: {args.save_results}")
        if args.report:
            _report(args.report, config, model_info, outcomes)


def run_report(args: argparse.Namespace) -> None:
    from gaussad.results import is_results_folder, load_results

    if is_results_folder(args.root):
        _report(args.output, *load_results(args.root))
        return
    evaluations = _evaluate(args, keep_maps=True)
    _report(args.output, _run_config(args), evaluations[0].model_info, _category_reports(evaluations))


def run_calibrate(args: argparse.Namespace) -> None:
    from gaussad.decisions import manual_threshold
    from gaussad.evaluation import calibrate_on_labeled, find_category

    if args.category and not args.val_root:
        raise GaussADError("--category chooses among the categories of VAL_ROOT: give VAL_ROOT too")
    category = find_category(args.val_root, args.category) if args.val_root else None
    model = _load_model(args)
    if category is not None:
        image, pixel = calibrate_on_labeled(model, category, args.max_false_alarm_rate)
    elif args.max_false_alarm_rate is not None:
        image, pixel = model.label_free_thresholds(args.max_false_alarm_rate)
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
    backbone, config = model.backbone_, model.config
    print(f"model: {Path(args.model_dir)} (format version {FORMAT_VERSION})")
    print(f"backbone: {backbone.name} ({backbone.weights_source}, SHA-256 {backbone.weights_sha256})")
    print(f"input: {model.image_size_} px; trained on {model.n_train_} images")
    print(
        f"reduction: {config.reduction} {config.variance}; localization: {config.localization}; "
        f"blur sigma: {config.blur_sigma}; image grid: {config.image_grid} x {config.image_grid}"
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
    calibrate.add_argument("--category", help="the category of VAL_ROOT to use, where it holds several")
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


def _run(args: argparse.Namespace) -> None:
    from gaussad.tuning import cpu_tuning

    with cpu_tuning():
        args.handler(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except GaussADError as error:
        print(f"gaussad: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gaussad: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
