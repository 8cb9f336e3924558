"""Model folders: `model.json` (configuration, format version, checksums) and `gaussians.safetensors`.

No pickle. Backbone weights are referenced by name and SHA-256, never copied. A folder is written next to
its destination and swapped in (`fileio.replace_folder`), so a failed save leaves an earlier model intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from gaussad import __version__
from gaussad.backbones import file_sha256, load_backbone
from gaussad.calibration import Threshold
from gaussad.errors import GaussADError
from gaussad.features import resolve_device
from gaussad.fileio import replace_folder
from gaussad.gaussian import Gaussian

if TYPE_CHECKING:
    from gaussad.model import GaussAD

FORMAT = "gaussad-model"
FORMAT_VERSION = 3  # 3: the hybrid map's position Gaussian; 2: grid-pooled image features (1 is not read)
READABLE_VERSIONS = (2, 3)  # a version 2 model has no position Gaussian: shared or per-position maps
CONFIG_FILE = "model.json"
TENSORS_FILE = "gaussians.safetensors"
SAVED_PARAMS = (
    "backbone",
    "reduction",
    "variance",
    "localization",
    "blur_sigma",
    "image_grid",
    "precision",
    "folds",
    "max_false_alarm_rate",
)
POSITION_KEY = "position"
HELD_OUT = ("held_out_scores_", "held_out_map_maxima_", "held_out_map_medians_")


def save_model(model: GaussAD, directory: Path) -> Path:
    """Save a fitted model; returns the folder written."""
    tensors: dict[str, np.ndarray] = {}
    named = [
        *((f"image.{level}", g) for level, g in zip(model.levels_, model.image_gaussians_, strict=True)),
        *((f"map.{level}", g) for level, g in zip(model.map_levels_, model.map_gaussians_, strict=True)),
    ]
    if model.position_gaussian_ is not None:
        named.append((POSITION_KEY, model.position_gaussian_))
    for key, gaussian in named:
        tensors[f"{key}.mean"] = np.ascontiguousarray(gaussian.mean, dtype=np.float64)
        tensors[f"{key}.whitening"] = np.ascontiguousarray(gaussian.whitening, dtype=np.float64)
        tensors[f"{key}.shrinkage"] = np.atleast_1d(np.asarray(gaussian.shrinkage, dtype=np.float64))
    for name in HELD_OUT:
        tensors[name.rstrip("_")] = np.ascontiguousarray(getattr(model, name), dtype=np.float64)
    backbone = model.backbone_
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gaussad_version": __version__,
        "params": {name: getattr(model, name) for name in SAVED_PARAMS},
        "backbone": {
            "name": backbone.name,
            "weights_source": backbone.weights_source,
            "weights_path": backbone.weights_path,
            "weights_sha256": backbone.weights_sha256,
        },
        "levels": list(model.levels_),
        "map_levels": list(model.map_levels_),
        "position_levels": list(model.position_levels_),
        "image_size": model.image_size_,
        "n_train": model.n_train_,
        "gaussians": model.describe_levels(),
        "thresholds": {
            "image": model.image_threshold_.as_dict() if model.image_threshold_ else None,
            "pixel": model.pixel_threshold_.as_dict() if model.pixel_threshold_ else None,
        },
    }

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / TENSORS_FILE))
        config["tensors_sha256"] = file_sha256(folder / TENSORS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    return replace_folder(directory, write, marker=CONFIG_FILE)


def read_config(directory: Path) -> dict:
    """The model's JSON configuration, checked for format and version."""
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise GaussADError(f"{directory}: no such model folder")
    if not path.is_file():
        raise GaussADError(f"{directory}: not a gaussad model folder (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GaussADError(f"{path}: corrupt model configuration ({error})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise GaussADError(f"{path}: not a gaussad model configuration")
    if config.get("format_version") not in READABLE_VERSIONS:
        readable = " and ".join(map(str, READABLE_VERSIONS))
        raise GaussADError(
            f"{path}: model format version {config.get('format_version')} is not supported "
            f"(this gaussad reads versions {readable}); refit the model"
        )
    return config


def load_model(cls: type[GaussAD], directory: Path, device: str = "auto", **overrides) -> GaussAD:
    """Rebuild a fitted model from its folder, verifying checksums of the tensors and backbone weights."""
    config = read_config(directory)
    tensors_path = directory / TENSORS_FILE
    if not tensors_path.is_file():
        raise GaussADError(f"{tensors_path}: missing")
    if file_sha256(tensors_path) != config.get("tensors_sha256"):
        raise GaussADError(f"{tensors_path}: corrupt (checksum does not match {CONFIG_FILE})")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError) as error:
        raise GaussADError(f"{tensors_path}: corrupt ({error})") from None

    saved_backbone = config["backbone"]
    weights = overrides.pop("weights", None) or saved_backbone["weights_path"]
    if saved_backbone["weights_source"] != "file":
        weights = None
    model = cls(**config["params"], weights=weights, device=device, **overrides)
    model.backbone_ = load_backbone(saved_backbone["name"], weights)
    expected = saved_backbone["weights_sha256"]
    if expected and model.backbone_.weights_sha256 != expected:
        raise GaussADError(
            f"backbone weights {model.backbone_.weights_path} differ from those the model was fitted with "
            f"(SHA-256 {model.backbone_.weights_sha256[:12]}..., expected {expected[:12]}...)"
        )
    model.device_ = resolve_device(device)
    model.levels_ = tuple(config["levels"])
    model.map_levels_ = tuple(config["map_levels"])
    model.position_levels_ = tuple(config.get("position_levels", ()))
    model.image_size_ = int(config["image_size"])
    model.n_train_ = int(config["n_train"])

    def gaussian(key: str) -> Gaussian:
        try:
            return Gaussian(
                mean=tensors[f"{key}.mean"],
                whitening=tensors[f"{key}.whitening"],
                shrinkage=tensors[f"{key}.shrinkage"],
            )
        except KeyError as missing:
            raise GaussADError(f"{tensors_path}: missing tensor {missing}") from None

    thresholds = config.get("thresholds", {})
    model.image_threshold_ = Threshold(**thresholds["image"]) if thresholds.get("image") else None
    model.pixel_threshold_ = Threshold(**thresholds["pixel"]) if thresholds.get("pixel") else None
    for name in HELD_OUT:
        setattr(model, name, tensors.get(name.rstrip("_"), np.empty(0)))
    model.image_gaussians_ = [gaussian(f"image.{level}") for level in model.levels_]
    model.map_gaussians_ = [gaussian(f"map.{level}") for level in model.map_levels_]
    model.position_gaussian_ = gaussian(POSITION_KEY) if model.position_levels_ else None
    model._on_device = None
    return model
