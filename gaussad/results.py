"""Saved evaluation results: enough to write a report later without fitting again.

A results folder holds `results.json` (format, configuration, model info, per-category metrics and
thresholds) and one `<category>.npz` per category with each test image's path, defect type, score, and its
anomaly map and ground truth at `evaluation.STORED_SIDE` square (float16 maps, boolean masks): a few MB
per category instead of the full-resolution maps. A category evaluated without ground truth has no masks
in its `.npz` and null pixel metrics in `results.json`.

Format version 2 keeps each threshold whole (value, typical normal value, method, source); version 1
kept the values and one source line, and is still read: its typical normal values are taken from the
good test images (the median of their scores, and of their stored maps).
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import numpy as np

from gaussad.calibration import Threshold
from gaussad.errors import GaussADError
from gaussad.evaluation import CategoryPredictions, CategoryResult, stored_size
from gaussad.fileio import replace_folder
from gaussad.layout import LabeledImage
from gaussad.report import CategoryReport

FORMAT = "gaussad-results"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
RESULTS_FILE = "results.json"


def save_results(
    directory: str | os.PathLike, config: dict, model_info: dict, outcomes: list[CategoryReport]
) -> Path:
    """Write a results folder atomically (replacing an earlier one)."""
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config,
        "model_info": model_info,
        "categories": [],
    }

    def write(folder: Path) -> None:
        for outcome in outcomes:
            predictions = outcome.predictions
            name = outcome.result.category
            np.savez_compressed(folder / f"{name}.npz", **_prediction_arrays(predictions))
            document["categories"].append(
                {
                    "result": outcome.result.as_dict(),
                    "image_threshold": outcome.image_threshold.as_dict(),
                    "pixel_threshold": outcome.pixel_threshold.as_dict(),
                    "predictions": f"{name}.npz",
                }
            )
        (folder / RESULTS_FILE).write_text(json.dumps(document, indent=2) + "\n")

    return replace_folder(directory, write, marker=RESULTS_FILE)


def _prediction_arrays(predictions: CategoryPredictions) -> dict[str, np.ndarray]:
    """A category's predictions as the arrays of its `.npz`; masks only where it has ground truth."""
    arrays = {
        "paths": np.array([str(image.path) for image in predictions.images]),
        "defects": np.array([image.defect for image in predictions.images]),
        "mask_paths": np.array([str(image.mask_path or "") for image in predictions.images]),
        "scores": predictions.scores,
        "maps": np.stack([stored_size(m) for m in predictions.maps]).astype(np.float16),
    }
    if predictions.masks:
        arrays["masks"] = np.stack([stored_size(m) for m in predictions.masks])
    return arrays


def is_results_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / RESULTS_FILE).is_file()


def load_results(directory: str | os.PathLike) -> tuple[dict, dict, list[CategoryReport]]:
    """(config, model info, outcomes) of a results folder; a wrong or damaged folder is a clear error."""
    directory = Path(directory)
    path = directory / RESULTS_FILE
    document = _read_document(path)
    outcomes = []
    for index, entry in enumerate(document["categories"]):
        where = f"{path}: categories[{index}]"
        _expect(entry, ("result", "image_threshold", "pixel_threshold", "predictions"), where)
        if not isinstance(entry["predictions"], str):
            raise GaussADError(f"{where}.predictions: expected a file name")
        result = _build(CategoryResult, entry["result"], f"{where}.result")
        predictions = _read_predictions(directory / entry["predictions"])
        if document["format_version"] == 1:
            image, pixel = _version_1_thresholds(entry, predictions, where)
        else:
            image = _build(Threshold, entry["image_threshold"], f"{where}.image_threshold")
            pixel = _build(Threshold, entry["pixel_threshold"], f"{where}.pixel_threshold")
        outcomes.append(CategoryReport(result, predictions, image, pixel))
    return document["config"], document["model_info"], outcomes


def _read_document(path: Path) -> dict:
    """results.json as an object with the keys every version has, checked."""
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GaussADError(f"{path}: cannot read results ({error})") from None
    if not isinstance(document, dict):
        raise GaussADError(f"{path}: not gaussad results (a JSON {type(document).__name__}, not an object)")
    if document.get("format") != FORMAT or document.get("format_version") not in READABLE_VERSIONS:
        raise GaussADError(f"{path}: not gaussad results of format version {FORMAT_VERSION}")
    _expect(document, ("config", "model_info", "categories"), str(path))
    for key, kind in (("config", dict), ("model_info", dict), ("categories", list)):
        if not isinstance(document[key], kind):
            raise GaussADError(f"{path}: {key} must be a JSON {'object' if kind is dict else 'array'}")
    return document


def _expect(values: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(values, dict):
        raise GaussADError(f"{where}: expected an object, got {type(values).__name__}")
    missing = [key for key in keys if key not in values]
    if missing:
        raise GaussADError(f"{where}: missing {', '.join(missing)}")


def _build(cls: type, values: Any, where: str) -> Any:
    """A dataclass from a JSON object whose keys must be its fields, each of the field's kind (number,
    text, or null where allowed): anything else is an error naming it."""
    _expect(values, tuple(f.name for f in fields(cls) if f.default is MISSING), where)
    kinds = {f.name: str(f.type) for f in fields(cls)}
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise GaussADError(f"{where}: unknown keys {', '.join(unknown)}")
    for key, value in values.items():
        if not _of_kind(value, kinds[key]):
            raise GaussADError(f"{where}.{key}: {value!r} is not {kinds[key]}")
    return cls(**values)


def _of_kind(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a field annotated (as text) with str, int, float and None."""
    if value is None:
        return "None" in annotation
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return "int" in annotation or "float" in annotation
    if isinstance(value, float):
        return "float" in annotation
    return isinstance(value, str) and "str" in annotation


def _read_predictions(path: Path) -> CategoryPredictions:
    try:
        with np.load(path) as stored:
            images = [
                LabeledImage(Path(p), str(d), Path(m) if m else None)
                for p, d, m in zip(stored["paths"], stored["defects"], stored["mask_paths"], strict=True)
            ]
            maps = list(stored["maps"].astype(np.float32))
            masks = list(stored["masks"]) if "masks" in stored.files else []
            return CategoryPredictions(images, stored["scores"], maps, masks)
    except (OSError, KeyError, ValueError) as error:
        raise GaussADError(f"{path}: cannot read predictions ({error})") from None


def _version_1_thresholds(
    entry: dict, predictions: CategoryPredictions, where: str
) -> tuple[Threshold, Threshold]:
    """Thresholds of a version 1 entry (values and one source line); the typical normal values, which it
    did not keep, are the medians of the good test images' scores and stored maps."""
    _expect(entry, ("threshold_source",), where)
    method, _, source = str(entry["threshold_source"]).partition(": ")
    good = [index for index, image in enumerate(predictions.images) if image.label == 0]
    if not good:
        raise GaussADError(f"{where}: no good test images to take the typical normal values from")
    values = [entry[key] for key in ("image_threshold", "pixel_threshold")]
    if not all(_of_kind(value, "float") for value in values):
        raise GaussADError(f"{where}: thresholds must be numbers, got {values}")
    image_level = float(np.median(np.asarray(predictions.scores)[good]))
    pixel_level = float(np.median(np.concatenate([predictions.maps[index].ravel() for index in good])))
    return (
        Threshold(float(values[0]), image_level, method, source),
        Threshold(float(values[1]), pixel_level, method, source),
    )
