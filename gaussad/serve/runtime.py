"""The model behind a served name, behind one small interface so that another runtime can plug in.

`ServedModel` is what the service asks of a model: squash decoded pixels to its input, score a batch of
inputs, resize a map to an image's size, and describe itself. `TorchModel` does it with the library: a
`GaussAD` loaded from its folder, `gaussad.features.prepare` and `BatchRunner.normalize` as prediction
uses them, and `Scorer`, so answers equal `gaussad predict`'s. A served model is immutable: a reload
builds a new one and the service swaps it in between batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gaussad.calibration import Threshold
from gaussad.errors import GaussADError
from gaussad.features import BatchRunner, prepare
from gaussad.maps import resize_map
from gaussad.model import GaussAD
from gaussad.persistence import model_sha256


class ServedModel(Protocol):
    """What the service needs of a model, whatever runs it."""

    name: str
    folder: Path
    sha256: str  # `gaussad.persistence.model_sha256` of the folder the model was read from
    image_threshold: Threshold
    pixel_threshold: Threshold | None
    held_out_scores: np.ndarray  # normal scores kept at fit time: drift's reference

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 pixels -> the model input (S, S, 3) uint8."""

    def score(self, inputs: np.ndarray, with_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, S, S, 3) inputs -> float64 scores (B,) and, with maps, float32 maps (B, S, S)."""

    def full_size_map(self, anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """A map (S, S) at an image's (height, width), as prediction resizes it."""

    def describe(self) -> dict[str, Any]:
        """Metadata for clients: input size, preprocessing, thresholds, training set, backbone."""


class TorchModel:
    """A model folder written by `gaussad fit`, scored by the library's `Scorer` in PyTorch."""

    def __init__(self, name: str, folder: Path, device: str) -> None:
        self.name, self.folder = name, folder
        self.sha256, self.model = _load_consistent(folder, device)
        if self.model.image_threshold_ is None:
            raise GaussADError(
                f"{folder}: the model has no image threshold; set one with `gaussad calibrate`"
            )
        self.image_threshold: Threshold = self.model.image_threshold_
        self.pixel_threshold = self.model.pixel_threshold_
        self.held_out_scores = np.asarray(self.model.held_out_scores_, dtype=np.float64)
        self._input = BatchRunner(
            self.model.scorer_, self.model.backbone_.preprocessing, self.model.image_size_, self.model.device_
        )

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        return prepare(pixels, self.model.image_size_)[0]

    def score(self, inputs: np.ndarray, with_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        with torch.inference_mode():
            scores, maps = self.model.scorer_(self._input.normalize(inputs), with_maps=with_maps)
        return scores.cpu().numpy().astype(np.float64), maps.cpu().numpy() if with_maps else None

    def full_size_map(self, anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return resize_map(torch.from_numpy(anomaly_map), size).numpy()

    def describe(self) -> dict[str, Any]:
        model, state = self.model, self.model.state_
        preprocessing = model.backbone_.preprocessing
        return {
            "input_size": [model.image_size_, model.image_size_],
            "preprocessing": {
                "color": "8-bit RGB; grayscale, 16-bit, palette, alpha, CMYK and EXIF orientation handled",
                "resize": "squashed to the square input, bilinear with antialiasing",
                "mean": list(preprocessing.mean),
                "std": list(preprocessing.std),
            },
            "thresholds": {
                "image": self.image_threshold.as_dict(),
                "pixel": self.pixel_threshold.as_dict() if self.pixel_threshold else None,
            },
            "n_train": model.n_train_,
            "backbone": {"name": state.backbone.name, "weights_sha256": state.backbone.weights_sha256},
            "config": model.config.as_dict(),
        }


def _load_consistent(folder: Path, device: str, attempts: int = 3) -> tuple[str, GaussAD]:
    """The model and the SHA-256 of the very files it was read from: a `gaussad calibrate` that swaps the
    folder between the two reads makes them differ, and the load is tried again."""
    for _ in range(attempts):
        before = model_sha256(folder)
        model = GaussAD.load(folder, device=device)
        if model_sha256(folder) == before:
            return before, model
    raise GaussADError(f"{folder}: the model folder kept changing while it was read; try again")


def load_served_model(name: str, folder: Path, device: str) -> ServedModel:
    """The runtime for a model folder: today every folder is a `gaussad fit` model run by PyTorch."""
    if not folder.is_dir():
        raise GaussADError(f"{folder}: no such model folder")
    return TorchModel(name, folder, device)
