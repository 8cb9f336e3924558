"""The model behind a served name, behind one small interface so that another runtime can plug in.

`ServedModel` is what the service asks of a model: resize decoded pixels to its input, score a batch of
inputs, resize a map to an image's size, and describe itself. `load_served_model` picks the runtime by the
path it is given:

- a model folder written by `gaussad fit`: `gaussad.serve.torch_model.TorchModel`, scored by the library
  in PyTorch, so answers equal `gaussad predict MODEL_DIR`'s;
- a `.onnx` file written by `gaussad export`: `ExportedModel`, scored by `gaussad.runtime.OnnxModel` in
  onnxruntime, so answers equal `gaussad predict model.onnx`'s.

This module imports no PyTorch, and PyTorch is imported only when a folder is loaded: a service of exported
files runs where it is not installed. A served model is immutable: a reload builds a new one and the
service swaps it in between batches.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from gaussad.calibration import Threshold
from gaussad.errors import GaussADError
from gaussad.fileio import file_sha256
from gaussad.framing import Window, map_in_image
from gaussad.runtime import (
    META_BACKBONE,
    META_BACKBONE_SHA256,
    META_MODEL_SHA256,
    META_NORMALIZATION,
    META_PARAMS,
    META_VERSION,
    OnnxModel,
    prepare_pixels,
    resize_map,
)
from gaussad.serve.settings import check_model_path, is_exported

Loaded = TypeVar("Loaded")


class ServedModel(Protocol):
    """What the service needs of a model, whatever runs it."""

    name: str
    path: Path  # what it was read from, and what a reload reads again: a model folder or an exported file
    sha256: str  # its identity in answers and the audit trail: the SHA-256 of the folder's or file's bytes
    platform: str  # what runs it, as the Open Inference Protocol's model metadata names it
    image_threshold: Threshold
    pixel_threshold: Threshold | None
    # Normal scores kept at fit time, those the label-free threshold is a quantile of (far-out training
    # images' left out): drift's reference (empty where unknown).
    held_out_scores: np.ndarray

    def prepare(self, pixels: np.ndarray) -> tuple[np.ndarray, Window]:
        """(H, W, 3) uint8 pixels -> the model input (h, w, 3) uint8, and the window of the image it shows."""

    def score(self, inputs: np.ndarray, with_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, h, w, 3) inputs -> float64 scores (B,) and, with maps, float32 maps (B, h, w)."""

    def full_size_map(self, anomaly_map: np.ndarray, size: tuple[int, int], window: Window) -> np.ndarray:
        """A map (h, w) made for `window` of an image, at the image's (height, width), as prediction
        resizes it."""

    def describe(self) -> dict[str, Any]:
        """Metadata for clients: input size, preprocessing, thresholds, training set, backbone, config."""


class ExportedModel:
    """A file written by `gaussad export`, scored by `gaussad.runtime.OnnxModel` without PyTorch: its input
    resize, graph and map resize, as `gaussad predict model.onnx` runs them. Its identity is the SHA-256 of
    the file; the SHA-256 of the folder it was exported from is in `describe()`. Drift's reference is the
    file's threshold scores; a file exported before it kept them has none, and only the flagged share is
    reported."""

    platform = "gaussad_onnxruntime"

    def __init__(self, name: str, path: Path, device: str) -> None:
        self.name, self.path = name, path
        self.sha256, self.model = read_consistent(
            path, readable_sha256, lambda: OnnxModel.load(path, device=device)
        )
        self.image_threshold, self.pixel_threshold = decision_thresholds(
            path, self.model, "set one with `gaussad calibrate` and export again"
        )
        self.held_out_scores = self.model.threshold_scores_

    def prepare(self, pixels: np.ndarray) -> tuple[np.ndarray, Window]:
        return prepare_pixels(pixels, self.model.input_size_, self.model.crop_)

    def score(self, inputs: np.ndarray, with_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.model.run(inputs)
        return outputs["scores"].astype(np.float64), outputs["maps"] if with_maps else None

    def full_size_map(self, anomaly_map: np.ndarray, size: tuple[int, int], window: Window) -> np.ndarray:
        return map_in_image(anomaly_map, window, size, size, resize_map)

    def describe(self) -> dict[str, Any]:
        metadata = self.model.metadata
        normalization = json.loads(metadata[META_NORMALIZATION])
        return describe_input(
            self.model.input_size_,
            normalization["mean"],
            normalization["std"],
            self.image_threshold,
            self.pixel_threshold,
        ) | {
            "n_train": None,  # not in the file
            "backbone": {
                "name": metadata[META_BACKBONE],
                "weights_sha256": metadata[META_BACKBONE_SHA256] or None,
            },
            "config": json.loads(metadata[META_PARAMS]),
            "exported_from": {
                "model_sha256": metadata[META_MODEL_SHA256],
                "gaussad_version": metadata[META_VERSION],
            },
        }


def describe_input(
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    image_threshold: Threshold,
    pixel_threshold: Threshold | None,
) -> dict[str, Any]:
    """What every runtime's `describe()` starts with: the input, its preprocessing and the thresholds."""
    return {
        "input_size": list(size),  # [height, width]
        "preprocessing": {
            "color": "8-bit RGB; grayscale, 16-bit, palette, alpha, CMYK and EXIF orientation handled",
            "resize": "to input_size (height, width) whatever the image's aspect ratio, bilinear with "
            "antialiasing",
            "mean": list(mean),
            "std": list(std),
        },
        "thresholds": {
            "image": image_threshold.as_dict(),
            "pixel": pixel_threshold.as_dict() if pixel_threshold else None,
        },
    }


def decision_thresholds(path: Path, model: Any, remedy: str) -> tuple[Threshold, Threshold | None]:
    """A loaded model's image and pixel thresholds: a model without an image threshold cannot decide, and
    is refused naming `path` and the `remedy`."""
    if model.image_threshold_ is None:
        raise GaussADError(f"{path}: the model has no image threshold; {remedy}")
    return model.image_threshold_, model.pixel_threshold_


def readable_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes; a file that cannot be read is a `GaussADError` naming it."""
    try:
        return file_sha256(path)
    except OSError as error:
        raise GaussADError(f"{path}: cannot read it ({error.strerror or error})") from None


def read_consistent(
    path: Path, digest: Callable[[Path], str], load: Callable[[], Loaded], attempts: int = 3
) -> tuple[str, Loaded]:
    """What `load` reads from `path`, with the digest of the very bytes it read: a `gaussad calibrate` or
    `gaussad export` that replaces them between the two digests makes them differ, and the load is tried
    again."""
    for _ in range(attempts):
        before = digest(path)
        loaded = load()
        if digest(path) == before:
            return before, loaded
    raise GaussADError(f"{path}: the model kept changing while it was read; try again")


def load_served_model(name: str, path: Path, device: str) -> ServedModel:
    """The runtime for a path: an exported `.onnx` file in onnxruntime, a model folder in PyTorch."""
    check_model_path(path)
    if is_exported(path):
        return ExportedModel(name, path, device)
    from gaussad.serve.torch_model import TorchModel

    return TorchModel(name, path, device)
