"""A served model folder scored in PyTorch: imported only when a folder is served, so that a service of
exported ONNX files runs where PyTorch is not installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from gaussad.features import BatchRunner, prepare
from gaussad.framing import Window, map_in_image
from gaussad.maps import resized_array
from gaussad.model import GaussAD
from gaussad.persistence import model_sha256
from gaussad.serve.runtime import decision_thresholds, describe_input, read_consistent


class TorchModel:
    """A model folder written by `gaussad fit`, scored by the library's `Scorer` in PyTorch: a `GaussAD`
    loaded from its folder, `gaussad.features.prepare` and `BatchRunner.normalize` as prediction uses them,
    so answers equal `gaussad predict`'s."""

    platform = "gaussad_pytorch"

    def __init__(self, name: str, path: Path, device: str) -> None:
        self.name, self.path = name, path
        self.sha256, self.model = read_consistent(
            path, model_sha256, lambda: GaussAD.load(path, device=device)
        )
        self.image_threshold, self.pixel_threshold = decision_thresholds(
            path, self.model, "set one with `gaussad calibrate`"
        )
        self.held_out_scores = np.asarray(self.model.threshold_scores_, dtype=np.float64)
        self._input = BatchRunner(
            self.model.scorer_, self.model.backbone_.preprocessing, self.model.input_size_, self.model.device_
        )

    def prepare(self, pixels: np.ndarray) -> tuple[np.ndarray, Window]:
        inputs, _, window = prepare(pixels, self.model.input_size_, crop=self.model.crop_)
        return inputs, window

    def score(self, inputs: np.ndarray, with_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        with torch.inference_mode():
            scores, maps = self.model.scorer_(self._input.normalize(inputs), with_maps=with_maps)
        return scores.cpu().numpy().astype(np.float64), maps.cpu().numpy() if with_maps else None

    def full_size_map(self, anomaly_map: np.ndarray, size: tuple[int, int], window: Window) -> np.ndarray:
        return map_in_image(torch.from_numpy(anomaly_map), window, size, size, resized_array)

    def describe(self) -> dict[str, Any]:
        model, state = self.model, self.model.state_
        preprocessing = model.backbone_.preprocessing
        return describe_input(
            model.input_size_,
            preprocessing.mean,
            preprocessing.std,
            self.image_threshold,
            self.pixel_threshold,
        ) | {
            "n_train": model.n_train_,
            "backbone": {"name": state.backbone.name, "weights_sha256": state.backbone.weights_sha256},
            "config": model.config.as_dict(),
        }
