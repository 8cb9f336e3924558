"""Model folders: `model.json` (parameters, fitted metadata, format version, checksums) and
`gaussians.safetensors` (the fitted arrays).

No pickle. Backbone weights are referenced by name and SHA-256, never copied. A folder is written next to
its destination and swapped in (`fileio.replace_folder`), so a failed save leaves an earlier model intact.
This module reads and writes files only: it knows `ModelConfig` and `FittedState`, not the estimator.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from gaussad import __version__
from gaussad.config import ModelConfig
from gaussad.errors import GaussADError
from gaussad.fileio import file_sha256, replace_folder
from gaussad.modelfolder import CONFIG_FILE, FORMAT, FORMAT_VERSION, TENSORS_FILE, read_config
from gaussad.state import FittedState


def save_model(directory: Path, config: ModelConfig, state: FittedState) -> Path:
    """Save a fitted model's parameters and state; returns the folder written."""
    tensors, metadata = state.to_tensors()
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gaussad_version": __version__,
        "params": config.as_dict(),
        **metadata,
    }

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / TENSORS_FILE))
        document["tensors_sha256"] = file_sha256(folder / TENSORS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")

    return replace_folder(directory, write, marker=CONFIG_FILE)


def model_sha256(directory: str | os.PathLike) -> str:
    """The identity of a model folder: SHA-256 over its two files' SHA-256s (model.json, then the tensors).
    It changes whenever either file does, thresholds included, so an answer can name the model it used."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, TENSORS_FILE):
        path = directory / name
        if not path.is_file():
            raise GaussADError(f"{path}: missing")
        digest.update(f"{name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def load_model(directory: Path) -> tuple[ModelConfig, FittedState]:
    """A model folder's parameters and fitted state, its tensors verified against their checksum.

    Models saved before the parameters held the levels and input size get them from the fitted metadata,
    those saved before mixtures their one Gaussian per map level.
    """
    document = read_config(directory)
    path = directory / CONFIG_FILE
    tensors_path = directory / TENSORS_FILE
    if not tensors_path.is_file():
        raise GaussADError(f"{tensors_path}: missing")
    if file_sha256(tensors_path) != document.get("tensors_sha256"):
        raise GaussADError(f"{tensors_path}: corrupt (checksum does not match {CONFIG_FILE})")
    try:
        tensors: dict[str, np.ndarray] = load_file(str(tensors_path))
    except (SafetensorError, OSError) as error:
        raise GaussADError(f"{tensors_path}: corrupt ({error})") from None
    state = FittedState.from_tensors(tensors, document, where=f"{path}, {tensors_path.name}")
    params = document.get("params")
    if not isinstance(params, dict):
        raise GaussADError(f"{path}: model parameters missing or not an object")
    if document["format_version"] < 7:  # before mixtures: one Gaussian per map level
        params = {"mixture_clusters": 1, **params}
    if document["format_version"] < 8:  # before the crop: the whole image
        params = {"crop": "none", **params}
    resolved = state.resolved_options
    weights = document["backbone"].get("weights_path") if state.backbone.weights_source == "file" else None
    config = ModelConfig.from_dict({**resolved, "weights": weights, **params}, where=str(path))
    if {name: getattr(config, name) for name in resolved} != resolved:
        raise GaussADError(
            f"{path}: its parameters and its fitted description disagree on levels or input size"
        )
    return config, state
