"""Saved evaluation results: enough to write a report later without fitting again.

A results folder holds `results.json` (format, configuration, model info, per-category metrics and
thresholds) and one `<category>.npz` per category with each test image's path, defect type, score, and its
anomaly map and ground truth resized to a common side (float16 maps, boolean masks): a few MB per category
instead of the full-resolution maps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from gaussad.errors import GaussADError
from gaussad.evaluation import CategoryPredictions, CategoryResult, LabeledImage
from gaussad.fileio import replace_folder
from gaussad.report import CategoryReport

FORMAT = "gaussad-results"
FORMAT_VERSION = 1
RESULTS_FILE = "results.json"
STORED_SIDE = 256  # side of the stored maps and masks


def _square(values: np.ndarray, side: int, resample: Image.Resampling) -> np.ndarray:
    if values.shape == (side, side):
        return values
    mode = "F" if values.dtype != bool else "L"
    image = Image.fromarray(values.astype(np.float32) if mode == "F" else values.astype(np.uint8) * 255, mode)
    resized = np.asarray(image.resize((side, side), resample))
    return resized if mode == "F" else resized > 127


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
            np.savez_compressed(
                folder / f"{name}.npz",
                paths=np.array([str(image.path) for image in predictions.images]),
                defects=np.array([image.defect for image in predictions.images]),
                mask_paths=np.array([str(image.mask_path or "") for image in predictions.images]),
                scores=predictions.scores,
                maps=np.stack(
                    [_square(m, STORED_SIDE, Image.Resampling.BILINEAR) for m in predictions.maps]
                ).astype(np.float16),
                masks=np.stack(
                    [_square(m, STORED_SIDE, Image.Resampling.NEAREST) for m in predictions.masks]
                ),
            )
            document["categories"].append(
                {
                    "result": outcome.result.as_dict(),
                    "image_threshold": outcome.image_threshold,
                    "pixel_threshold": outcome.pixel_threshold,
                    "threshold_source": outcome.threshold_source,
                    "predictions": f"{name}.npz",
                }
            )
        (folder / RESULTS_FILE).write_text(json.dumps(document, indent=2) + "\n")

    return replace_folder(directory, write, marker=RESULTS_FILE)


def is_results_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / RESULTS_FILE).is_file()


def load_results(directory: str | os.PathLike) -> tuple[dict, dict, list[CategoryReport]]:
    """(config, model info, outcomes) of a results folder; a wrong or damaged folder is a clear error."""
    directory = Path(directory)
    path = directory / RESULTS_FILE
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise GaussADError(f"{path}: cannot read results ({error})") from None
    if document.get("format") != FORMAT or document.get("format_version") != FORMAT_VERSION:
        raise GaussADError(f"{path}: not gaussad results of format version {FORMAT_VERSION}")
    outcomes = []
    for entry in document["categories"]:
        try:
            with np.load(directory / entry["predictions"]) as stored:
                images = [
                    LabeledImage(Path(p), str(d), Path(m) if m else None)
                    for p, d, m in zip(stored["paths"], stored["defects"], stored["mask_paths"], strict=True)
                ]
                predictions = CategoryPredictions(
                    images, stored["scores"], list(stored["maps"].astype(np.float32)), list(stored["masks"])
                )
        except (OSError, KeyError, ValueError) as error:
            raise GaussADError(
                f"{directory / entry['predictions']}: cannot read predictions ({error})"
            ) from None
        outcomes.append(
            CategoryReport(
                CategoryResult(**entry["result"]),
                predictions,
                entry["image_threshold"],
                entry["pixel_threshold"],
                entry["threshold_source"],
            )
        )
    return document["config"], document["model_info"], outcomes
