"""Command-line tool: `gaussad fit`, `predict`, `evaluate`, `calibrate`, `info`, `report`, `export`,
`serve` and `history`.

It parses and prints; what the commands decide and write lives in the library (decisions, heatmaps,
evaluation, report, results). Each command runs inside `cpu_tuning()`, the process-wide CPU settings a
library user does not get unasked.

Exit status: 0 done; 2 a user error, or a file the system refused (one line on stderr); 3 done, but images
that could not be read were skipped (`--on-error skip`), each named on stderr; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gaussad import __version__
from gaussad.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_WORKERS,
    FEATURE_STORES,
    MODEL_OPTIONS,
    ModelConfig,
    describe_size,
)
from gaussad.errors import GaussADError
from gaussad.serve.commands import add_commands as add_serve_commands

# The library (torch, timm, matplotlib, scikit-learn) is imported inside the commands that use it:
# `gaussad --help` and argument errors answer at once instead of after seconds of imports.
if TYPE_CHECKING:
    from gaussad.calibration import Threshold
    from gaussad.decisions import PredictionRow
    from gaussad.evaluation import CategoryEvaluation, CategoryResult
    from gaussad.features import ImageError
    from gaussad.model import GaussAD
    from gaussad.report import CategoryReport
    from gaussad.runtime import OnnxModel

EXIT_USER_ERROR = 2
EXIT_SKIPPED = 3  # the run finished, but left out images it could not read
EXIT_BROKEN_PIPE = 141  # as a shell reports a command ended by SIGPIPE
# As gaussad.images.DEFAULT_MAX_PIXELS, without importing Pillow and numpy for `--help`.
DEFAULT_MAX_PIXELS = 100_000_000


def _levels(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected level numbers such as 3,4,5") from None


def _levels_or_none(text: str) -> list[int]:
    """Levels, or "none" for none at all (an empty list)."""
    return [] if text.strip().lower() == "none" else _levels(text)


def _image_size(text: str) -> int | tuple[int, int] | str:
    """--image-size: a side ("448") or height x width ("320x800"). Other text is passed on as it is, for
    `ModelConfig` to refuse in one line naming the option, as it does sides out of range."""
    parts = text.strip().lower().split("x")
    if len(parts) > 2 or not all(part.isascii() and part.isdigit() for part in parts):
        return text
    sides = [int(part) for part in parts]
    return sides[0] if len(sides) == 1 else (sides[0], sides[1])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number, at least 1")
    return value


def _add_runtime_options(
    parser: argparse.ArgumentParser, on_error: str | None = None, tmp_dir: bool = False
) -> None:
    """The run-time options; `--on-error` (with that default) where a run may skip images, the feature
    store and `--tmp-dir` where it fits."""
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
    group.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="refuse images that declare more pixels, before decoding them (default: %(default)s)",
    )
    if on_error is None:
        parser.set_defaults(on_error="stop")
    else:
        group.add_argument(
            "--on-error",
            choices=("skip", "stop"),
            default=on_error,
            help="an unreadable or too large image: skip it, name it and exit with status 3, or stop "
            "the run with status 2 (default: %(default)s)",
        )
    if tmp_dir:
        group.add_argument(
            "--feature-store",
            choices=FEATURE_STORES,
            default="disk",
            help="where the fit keeps the training features until its Gaussians are finished: disk (0.4 MB "
            "per image with the defaults, in --tmp-dir), memory, or none (the backbone runs over the "
            "training images again instead) (default: %(default)s)",
        )
        group.add_argument(
            "--tmp-dir",
            metavar="DIR",
            help="where the fit's disk feature store goes (default: TMPDIR, else the system's temporary "
            "folder)",
        )


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Where a command runs: here, or on a Ray cluster (`fit`, `predict`, `evaluate`)."""
    group = parser.add_argument_group("engine options")
    group.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process; ray: a Ray cluster, with the same results (default: %(default)s)",
    )
    group.add_argument(
        "--address",
        help="with --engine ray: the cluster to use ('auto': the one this machine belongs to); without "
        "it a local one is started for the run and stopped after it",
    )
    group.add_argument(
        "--actors",
        type=_positive_int,
        metavar="N",
        help="with --engine ray: workers at once (default: one per CPU of the cluster, per GPU on cuda)",
    )


def _ray_engine(args: argparse.Namespace) -> bool:
    """Whether the command runs on Ray; the cluster options are refused without it."""
    if args.engine != "ray":
        for option, unset in (("address", None), ("actors", None), ("restart", False)):
            if getattr(args, option, unset) != unset:
                raise GaussADError(f"--{option} applies to --engine ray only")
    return args.engine == "ray"


def _option_type(name: str, spec: dict[str, Any]) -> Any:
    """How the CLI parses a model option: levels lists, input sizes, file paths, or the type of the field."""
    if spec["kind"] == "levels":
        return _levels
    if spec["kind"] == "levels or none":
        return _levels_or_none
    if spec["kind"] == "size":
        return _image_size
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
        escaped = spec["help"].replace("%", "%%")  # argparse formats help with % placeholders
        help_text = escaped if default is None else f"{escaped} (default: %(default)s)"
        group.add_argument(
            "--" + name.replace("_", "-"),
            type=_option_type(name, spec),
            default=default,
            choices=spec["choices"] or None,
            metavar={"path": "FILE", "size": "N|HxW"}.get(spec["kind"]),
            help=help_text,
        )


def _runtime(args: argparse.Namespace) -> dict[str, Any]:
    """The run-time settings of a command, as `GaussAD` takes them."""
    return {
        "device": args.device,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "progress": not args.quiet,
        "on_error": args.on_error,
        "max_pixels": args.max_pixels,
    }


def _model_params(args: argparse.Namespace) -> dict[str, Any]:
    """`GaussAD`'s keyword arguments from a command's model and run-time options."""
    fitting = {"feature_store": args.feature_store} if "feature_store" in args else {}
    return {name: getattr(args, name) for name in MODEL_OPTIONS} | _runtime(args) | fitting


def _model_from_args(args: argparse.Namespace, **engine: Any) -> GaussAD:
    from gaussad.model import GaussAD

    return GaussAD(**_model_params(args), **engine)


def _exported(args: argparse.Namespace) -> bool:
    """Whether MODEL_DIR is an exported `.onnx` file; `--runtime` other than onnxruntime runs only those."""
    exported = Path(args.model_dir).suffix.lower() == ".onnx"
    if getattr(args, "runtime", "onnxruntime") != "onnxruntime" and not exported:
        raise GaussADError(f"--runtime {args.runtime}: runs exported .onnx files, not a model folder")
    return exported


def _load_model(args: argparse.Namespace) -> GaussAD | OnnxModel:
    """The model folder, or an exported `.onnx` file (scored without PyTorch by gaussad.runtime)."""
    if _exported(args):
        from gaussad.runtime import OnnxModel

        runtime = {key: value for key, value in _runtime(args).items() if key != "progress"}
        return OnnxModel.load(args.model_dir, engine=getattr(args, "runtime", "onnxruntime"), **runtime)
    return _load_folder(args.model_dir, **_runtime(args))


def _check_model_folder(model_dir: str) -> None:
    """A model folder's `model.json` read and checked: a wrong folder is said before PyTorch loads."""
    from gaussad.modelfolder import read_config

    read_config(Path(model_dir))


def _load_folder(model_dir: str, **runtime: Any) -> GaussAD:
    """A model folder, checked first (`_check_model_folder`)."""
    _check_model_folder(model_dir)
    from gaussad.model import GaussAD

    return GaussAD.load(model_dir, **runtime)


def _batch(text: str) -> int | str:
    if text == "dynamic":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'dynamic' or a number of images") from None


def run_export(args: argparse.Namespace) -> None:
    _check_model_folder(args.model_dir)
    from gaussad.export import export_onnx

    path = export_onnx(args.model_dir, args.output, opset=args.opset, batch=args.batch)
    print(f"exported {args.model_dir} to {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _skipped(errors: Sequence[ImageError]) -> int:
    """Name each image a run skipped on stderr; the exit status that says whether it skipped any."""
    for error in errors:
        print(f"gaussad: skipped {error.message}", file=sys.stderr)
    return EXIT_SKIPPED if errors else 0


def run_fit(args: argparse.Namespace) -> int:
    from gaussad.fileio import check_destination
    from gaussad.images import find_images
    from gaussad.modelfolder import CONFIG_FILE

    check_destination(args.output, CONFIG_FILE)
    # On Ray, the fit's pass over the images runs on the cluster.
    engine = {"engine": "ray", "address": args.address, "actors": args.actors} if _ray_engine(args) else {}
    images = find_images(args.train_dir)  # a wrong folder is said before PyTorch loads (seconds)
    model = _model_from_args(args, **engine).fit(images)
    model.save(args.output)
    status = _skipped(model.skipped_)
    skipped = f", skipped {len(model.skipped_)}" if model.skipped_ else ""
    print(
        f"fitted on {_count(model.n_train_, 'image')}{skipped} in {model.fit_seconds_:.1f} s; "
        f"saved to {args.output}"
    )
    _say_how_fitted(model.state_.selection or {}, [path.name for path in model.far_out_among(images)])
    return status


def _say_how_fitted(selection: dict, names: Sequence[str], where: str = "", shown: int = 10) -> None:
    """After a fit, each line after `where`: the options a rule decided rather than as given, and why
    (`decided_by_rule`), and the training images whose held-out score lies far above the others' (likely
    defective), by name."""
    for line in decided_by_rule(selection):
        print(where + line)
    if names:
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        print(
            f"{where}{_count(len(names), 'training image')} scored far above the others, likely defective, "
            f"and left out of the thresholds: {', '.join(names[:shown])}{more}"
        )


def _say_if_good_images_shifted(result: CategoryResult) -> None:
    """After an evaluation's table: where a category's good test images score above its training images
    beyond chance (`evaluation.describe_good_shift`), that, and what sets a threshold for them."""
    from gaussad.evaluation import describe_good_shift

    said = describe_good_shift(result)
    if said:
        print(
            f"{result.category}: {said}; `gaussad calibrate MODEL_DIR GOOD_FOLDER --max-false-alarm-rate R` "
            "sets thresholds on good images like them"
        )


def run_predict(args: argparse.Namespace) -> int:
    from gaussad.decisions import PREDICTIONS_FILE, output_names
    from gaussad.fileio import check_destination, output_folders

    check_destination(args.output, PREDICTIONS_FILE)
    if _ray_engine(args):
        return _predict_on_ray(args)
    if not _exported(args):
        _check_model_folder(args.model_dir)
    pairs = output_names(args.paths, exclude=output_folders(args.output))
    model = _load_model(args)
    rows, errors = _predict_here(args, model, pairs)
    return _predict_summary(args, rows, errors, model.image_threshold_)


def _predict_here(
    args: argparse.Namespace, model: GaussAD | OnnxModel, pairs: list[tuple[Path, Path]]
) -> tuple[list[PredictionRow], list[ImageError]]:
    """Local predict: the output written in a folder beside OUT and swapped in when complete."""
    from gaussad.decisions import PREDICTIONS_FILE, predictions_csv
    from gaussad.fileio import replace_folder
    from gaussad.outputs import PredictionWriter, ScoredImages, overall_range

    scored = ScoredImages()

    def write(folder: Path) -> None:
        nonlocal scored
        writer = PredictionWriter(folder, pairs, model, args.overlays, args.max_pixels)
        scored = writer.score(range(len(pairs)))
        value_range = overall_range(scored.map_ranges.values())
        if writer.scale is None and value_range:  # heatmaps only, on the range of all the run's maps
            writer.draw_saved(scored.map_ranges, value_range)
        (folder / PREDICTIONS_FILE).write_text(predictions_csv(scored.in_order()))

    replace_folder(args.output, write, marker=PREDICTIONS_FILE)
    return scored.in_order(), scored.errors


def _predict_on_ray(args: argparse.Namespace) -> int:
    """predict --engine ray (gaussad.cluster.predict): model folders only, resumed where interrupted."""
    from gaussad.cluster.predict import ray_predict
    from gaussad.decisions import output_names
    from gaussad.fileio import output_folders

    if _exported(args):
        raise GaussADError(f"{args.model_dir}: --engine ray scores model folders; run exported files locally")
    pairs = output_names(args.paths, exclude=output_folders(args.output))
    run = ray_predict(
        args.model_dir,
        pairs,
        args.output,
        _runtime(args),
        args.overlays,
        args.address,
        args.actors,
        args.restart,
    )
    return _predict_summary(args, run.rows, run.errors, run.image_threshold, run.resumed)


def _predict_summary(
    args: argparse.Namespace,
    rows: list[PredictionRow],
    errors: list[ImageError],
    image_threshold: Threshold | None,
    resumed: int = 0,
) -> int:
    """Name the images skipped, print the run's summary line; the exit status."""
    from gaussad.decisions import PREDICTIONS_FILE

    status = _skipped(errors)
    summary = f"scored {_count(len(rows) - len(errors), 'image')}"
    if resumed:
        summary += f" ({resumed} resumed from the interrupted run)"
    if image_threshold:
        flagged = sum(bool(row.decision and row.decision.is_anomalous) for row in rows)
        summary += f", {flagged} anomalous at threshold {image_threshold.value:.4g}"
    if errors:
        summary += f", skipped {len(errors)}"
    print(f"{summary}; wrote {Path(args.output) / PREDICTIONS_FILE}")
    return status


def format_table(results: list[CategoryResult], mean: dict[str, float | None]) -> str:
    """The results table; false-alarm and miss rates are at the model's label-free image threshold. Pixel
    metrics read n/a for a category without ground-truth masks; their mean is over those that have them."""

    def metric(value: float | None, width: int) -> str:
        return f"{'n/a' if value is None else f'{value:.4f}':>{width}}"

    header = f"{'category':<16}{'image AUROC':>12}{'pixel AUROC':>12}{'AUPRO':>8}{'FAR':>7}{'miss':>7}"
    header += f"{'train':>7}{'test':>6}{'fit s':>8}{'test s':>8}{'img/s':>8}"
    lines = [header, "-" * len(header)]
    for r in results:
        rates = "".join(
            f"{'-' if rate is None else f'{rate:.3f}':>7}" for rate in (r.false_alarm_rate, r.miss_rate)
        )
        lines.append(
            f"{r.category:<16}{r.image_auroc:>12.4f}{metric(r.pixel_auroc, 12)}{metric(r.aupro, 8)}{rates}"
            f"{r.n_train:>7}{r.n_test:>6}{r.fit_seconds:>8.1f}{r.test_seconds:>8.1f}"
            f"{r.test_images_per_second:>8.1f}"
        )
    if len(results) > 1:
        lines.append("-" * len(header))
        lines.append(
            f"{'mean':<16}{mean['image_auroc']:>12.4f}{metric(mean['pixel_auroc'], 12)}"
            f"{metric(mean['aupro'], 8)}"
        )
        masked = sum(r.pixel_auroc is not None for r in results)
        if 0 < masked < len(results):
            lines.append(f"pixel metrics: mean of the {masked} of {len(results)} categories with masks")
    return "\n".join(lines)


def _run_config(args: argparse.Namespace) -> dict:
    skip = ("handler", "json", "quiet", "report", "output", "save_results", "tmp_dir")
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in skip}, default=str))


def _evaluate(args: argparse.Namespace, keep_maps: bool) -> list[CategoryEvaluation]:
    """Evaluate every category asked for, printing the table; maps are kept only for reports."""
    from gaussad.layout import find_categories

    if keep_maps and args.folds == 0:  # said before the fits rather than after them
        raise GaussADError("reports and saved results need thresholds: fit with --folds 2 or more")
    categories = find_categories(args.root, args.category)  # before the library loads (seconds)
    from gaussad.evaluation import evaluate_category, mean_metrics

    if "engine" in args and _ray_engine(args):  # `report` has no engine options
        evaluations = _evaluate_on_ray(args, categories, keep_maps)
    else:
        evaluations = [
            evaluate_category(lambda: _model_from_args(args), category, args.eval_size, keep_maps=keep_maps)
            for category in categories
        ]
    results = [evaluation.result for evaluation in evaluations]
    print(format_table(results, mean_metrics(results)))
    for evaluation in evaluations:
        _say_how_fitted(evaluation.selection, evaluation.far_out, f"{evaluation.result.category}: ")
        _say_if_good_images_shifted(evaluation.result)
    return evaluations


def _evaluate_on_ray(
    args: argparse.Namespace, categories: list[Path], keep_maps: bool
) -> list[CategoryEvaluation]:
    """evaluate --engine ray (gaussad.cluster.evaluate): the model's arguments as a worker needs them."""
    from gaussad.cluster.evaluate import ray_evaluate

    params = _model_params(args)
    if params["weights"]:  # relative to this folder, not to a worker's
        params["weights"] = str(Path(params["weights"]).absolute())
    tmp_dir = args.tmp_dir and str(Path(args.tmp_dir).absolute())
    return ray_evaluate(params, categories, args.eval_size, keep_maps, args.address, args.actors, tmp_dir)


def _category_reports(evaluations: list[CategoryEvaluation]) -> list[CategoryReport]:
    from gaussad.report import category_report

    return [category_report(evaluation) for evaluation in evaluations]


def _report(path: str, config: dict, model_info: dict, outcomes: list[CategoryReport]) -> None:
    from gaussad.report import ReportData, write_report

    title = f"gaussad evaluation: {', '.join(o.result.category for o in outcomes)}"
    write_report(path, ReportData(title, config, model_info, outcomes))
    print(f"report: {path}")


def run_evaluate(args: argparse.Namespace) -> int:
    from gaussad.fileio import check_destination, check_file_destination, write_text_atomic

    for path in (args.json, args.report):  # checked before the fits, not after them
        if path:
            check_file_destination(path)
    if args.save_results:
        from gaussad.results import RESULTS_FILE

        check_destination(args.save_results, RESULTS_FILE)
    evaluations = _evaluate(args, keep_maps=bool(args.report or args.save_results))
    from gaussad.evaluation import mean_metrics
    from gaussad.results import save_results

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
    return _skipped([error for evaluation in evaluations for error in evaluation.skipped])


def run_report(args: argparse.Namespace) -> int:
    from gaussad.fileio import check_file_destination
    from gaussad.results import is_results_folder, load_results

    check_file_destination(args.output)
    if is_results_folder(args.root):
        _report(args.output, *load_results(args.root))
        return 0
    evaluations = _evaluate(args, keep_maps=True)
    _report(args.output, _run_config(args), evaluations[0].model_info, _category_reports(evaluations))
    return _skipped([error for evaluation in evaluations for error in evaluation.skipped])


def run_calibrate(args: argparse.Namespace) -> None:
    from gaussad.decisions import manual_threshold
    from gaussad.layout import find_category

    if args.category and not args.val_root:
        raise GaussADError("--category chooses among the categories of VAL_ROOT: give VAL_ROOT too")
    good = _good_images(args)
    category = find_category(args.val_root, args.category) if args.val_root and good is None else None
    model = _load_model(args)
    if good is not None:
        from gaussad.evaluation import calibrate_on_good

        image, pixel = calibrate_on_good(model, good, args.max_false_alarm_rate)
    elif category is not None:
        from gaussad.evaluation import calibrate_on_labeled

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


def _good_images(args: argparse.Namespace) -> list[Path] | None:
    """calibrate's VAL_ROOT as good images, where it is a folder of images rather than data in MVTec
    layout (which holds its labels in its folders); None where it is such data, or not given."""
    from gaussad.images import find_images
    from gaussad.layout import categories_in

    if not args.val_root or categories_in(Path(args.val_root)):
        return None
    images = find_images(args.val_root)  # names the folder where it is missing or holds no image
    if args.max_false_alarm_rate is None or args.category:
        raise GaussADError(
            f"{args.val_root}: a folder of images, not labelled data in MVTec layout: they are taken as good "
            "images, and --max-false-alarm-rate R sets the thresholds that flag that share of them"
            + (" (--category is for MVTec layout)" if args.category else "")
        )
    return images


def describe_thresholds(model: GaussAD) -> str:
    lines = []
    for kind, threshold in (("image", model.image_threshold_), ("pixel", model.pixel_threshold_)):
        if threshold is None:
            lines.append(f"{kind} threshold: none (fit with --folds 0; use `gaussad calibrate`)")
        else:
            lines.append(f"{kind} threshold: {threshold.value:.6g} ({threshold.method}: {threshold.source})")
    return "\n".join(lines)


def describe_selection(selection: dict) -> str:
    """The evidence of auto options, one line per candidate: its proxy metrics, the chosen one marked; then
    the options a rule decided (`decided_by_rule`)."""
    from gaussad.selection import candidate_rows

    candidates = []
    for option, name, metrics, chosen in candidate_rows(selection):
        values = ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if isinstance(value, float))
        candidates.append(f"  {'*' if chosen else ' '} {option.replace('_', ' ')} {name}: {values}")
    header = f"auto options, chosen on {selection.get('synthetic_images')} {selection.get('proxy')}:"
    lines = [header, *candidates] if candidates else []
    return "\n".join(lines + decided_by_rule(selection))


def decided_by_rule(selection: dict) -> list[str]:
    """The options a rule decided rather than the evidence (parts that move, too few images, no folds),
    one line each with the rule."""
    from gaussad.selection import rules

    if "fallback" in selection:
        return [f"auto options: {selection['fallback']}"]
    return [f"{option.replace('_', ' ')} by rule: {rule}" for option, rule in rules(selection).items()]


def run_info(args: argparse.Namespace) -> None:
    from gaussad.framing import describe_crop
    from gaussad.modelfolder import FORMAT_VERSION

    model = _load_folder(args.model_dir, device="cpu")
    backbone, config = model.backbone_, model.config
    print(f"model: {Path(args.model_dir)} (format version {FORMAT_VERSION})")
    print(f"backbone: {backbone.name} ({backbone.weights_source}, SHA-256 {backbone.weights_sha256})")
    print(f"input: {describe_size(model.image_size_)}; trained on {model.n_train_} images")
    print(f"crop: {config.crop}, {describe_crop(model.crop_)}")
    state = model.state_
    localization = state.localization
    if config.localization == "auto":
        localization = f"auto, chose {localization}"
    print(
        f"reduction: {config.reduction} {config.variance}; localization: {localization}; "
        f"blur sigma: {config.blur_sigma}"
    )
    score = state.image_score
    if config.image_score != state.image_score:
        score = (
            f"{config.image_score}, {'chose' if config.image_score == 'auto' else 'took'} {state.image_score}"
        )
    levels = ",".join(map(str, state.levels))
    whole = f"; global levels {','.join(map(str, state.global_levels))}" if state.global_levels else ""
    if state.score_map_levels:
        whole += f"; score map levels {','.join(map(str, state.score_map_levels))}"
    print(f"image score: {score}; levels {levels}; grid {state.image_grid} x {state.image_grid}{whole}")
    if state.selection:
        print(describe_selection(state.selection))
    for row in model.describe_levels():
        kept = f"{row['components']} of {row['channels']} components"
        if "clusters" in row:  # a hybrid map's mixture
            kept = f"{row['clusters']} Gaussians of up to {kept}"
        print(f"  {row['role']:<8} level {row['level']}: {kept}, shrinkage {row['shrinkage']:.4f}")
    print(describe_thresholds(model))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gaussad", description="Visual anomaly detection with Gaussians.")
    parser.add_argument("--version", action="version", version=f"gaussad {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="fit a model on a folder of defect-free images")
    fit.add_argument("train_dir", help="folder of good images (searched recursively)")
    fit.add_argument("-o", "--output", required=True, help="model folder to write")
    _add_model_options(fit)
    _add_runtime_options(fit, on_error="stop", tmp_dir=True)
    _add_engine_options(fit)
    fit.set_defaults(handler=run_fit)

    predict = commands.add_parser("predict", help="score images and write anomaly maps")
    predict.add_argument("model_dir", help="folder written by `gaussad fit`, or a file by `gaussad export`")
    predict.add_argument("paths", nargs="+", help="images or folders (searched recursively)")
    predict.add_argument("-o", "--output", required=True, help="folder for predictions.csv and maps/")
    predict.add_argument(
        "--overlays", action="store_true", help="also write overlays/: heatmap blended over each image"
    )
    predict.add_argument(
        "--runtime",
        choices=("onnxruntime", "openvino"),
        default="onnxruntime",
        help="what runs an exported .onnx file: onnxruntime, or OpenVINO's CPU runtime in float32 where "
        "it is installed (measured 1.1-1.4x faster on one thread) (default: %(default)s)",
    )
    _add_runtime_options(predict, on_error="skip")
    _add_engine_options(predict)
    predict.add_argument(
        "--restart",
        action="store_true",
        help="with --engine ray: discard an unfinished run of another model or other inputs into the same "
        "output folder, instead of refusing it (the same run is always resumed)",
    )
    predict.set_defaults(handler=run_predict)

    calibrate = commands.add_parser("calibrate", help="set a model's decision thresholds")
    calibrate.add_argument("model_dir", help="folder written by `gaussad fit` (updated in place)")
    calibrate.add_argument(
        "val_root",
        nargs="?",
        help="labelled data in MVTec layout: thresholds at the F1-optimal points; or a folder of good "
        "images, with --max-false-alarm-rate",
    )
    calibrate.add_argument("--category", help="the category of VAL_ROOT to use, where it holds several")
    calibrate.add_argument(
        "--max-false-alarm-rate",
        type=float,
        help="with VAL_ROOT: the rate on its good images (all of a folder of images); without: re-derive "
        "the label-free thresholds",
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
    _add_runtime_options(evaluate, on_error="stop", tmp_dir=True)
    _add_engine_options(evaluate)
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
    _add_runtime_options(report, on_error="stop", tmp_dir=True)
    report.set_defaults(handler=run_report)
    export = commands.add_parser("export", help="export a model to one ONNX file, scored without PyTorch")
    export.add_argument("model_dir", help="folder written by `gaussad fit`")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    export.add_argument(
        "--batch", type=_batch, default="dynamic", help="'dynamic' or a fixed number of images per run"
    )
    export.set_defaults(handler=run_export)

    add_serve_commands(commands)
    return parser


def _use_tmp_dir(folder: str) -> None:
    """--tmp-dir: where this process's temporary files go (the fit's spill), as TMPDIR would say."""
    path = Path(folder).absolute()
    if not path.is_dir():
        raise GaussADError(f"--tmp-dir {folder}: no such folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise GaussADError(f"--tmp-dir {folder}: no permission to write in it")
    tempfile.tempdir = str(path)


def _exported_only(args: argparse.Namespace) -> bool:
    """Whether a command runs exported `.onnx` files only (predict or serve), so needs no PyTorch."""
    if args.command == "predict":
        models = [args.model_dir]
    elif args.command == "serve":
        models = args.model_dirs
    else:
        return False
    return all(Path(model).suffix.lower() == ".onnx" for model in models)


def _check_model_options(args: argparse.Namespace) -> None:
    """A command's model options, checked before it reads anything or imports the library, so that a bad
    value answers at once in one line (`ModelConfig` names the option)."""
    if all(name in vars(args) for name in MODEL_OPTIONS):
        ModelConfig(**{name: getattr(args, name) for name in MODEL_OPTIONS})


def _run(args: argparse.Namespace) -> int:
    _check_model_options(args)
    if getattr(args, "tmp_dir", None):
        _use_tmp_dir(args.tmp_dir)
    if _exported_only(args):
        # The torch-free runtime: PyTorch's settings do not apply, and importing them would need PyTorch;
        # the allocator policy (torch-free) still speeds up decoding and resizing large images.
        from gaussad.allocator import keep_freed_memory

        with keep_freed_memory():
            return args.handler(args) or 0
    from gaussad.tuning import cpu_tuning

    with cpu_tuning():
        return args.handler(args) or 0


def _end_progress_lines() -> None:
    """Close the progress bars an error left open (in a generator not yet closed), so that they clear
    their line and the error does not follow a bar's text on it."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is not None:
        for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
            bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except GaussADError as error:
        _end_progress_lines()
        print(f"gaussad: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # the reader went away (`gaussad info MODEL | head`): stop quietly, as tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail
        return EXIT_BROKEN_PIPE
    except OSError as error:  # the system refused a file: no space, no permission, a read-only disk
        _end_progress_lines()
        print(f"gaussad: error: {error.filename or 'a file'}: {error.strerror or error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _end_progress_lines()
        print("gaussad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
