"""A model folder's document, `model.json`: its format and version, read and checked.

Light to import (no PyTorch, no NumPy), so that the command line names a wrong model folder before it
loads the library; `gaussad.persistence` reads and writes the whole folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from gaussad.errors import GaussADError

FORMAT = "gaussad-model"
# 8: the window around the part (`crop`); 7: the hybrid map's mixtures (the levels of its shared half
# with K Gaussians each); 6: the levels of the score map (the map part of map and combined scores) and
# their map Gaussians; 5: the combined score's global part (its levels, Gaussians and scale); 4: the image
# score's kind, grid and scales, and the evidence of auto options; 3: the hybrid map's position Gaussian;
# 2: grid-pooled image features (1 is not read)
FORMAT_VERSION = 8
# Versions 2 and 3 score pooled features, 4 a combined score of two parts; 2 has no position Gaussian;
# up to 5, the map part of a score is the anomaly map's; up to 7, the whole image is the input.
READABLE_VERSIONS = (2, 3, 4, 5, 6, 7, 8)
CONFIG_FILE = "model.json"
TENSORS_FILE = "gaussians.safetensors"


def read_config(directory: Path) -> dict:
    """The model's JSON document, checked for format and version."""
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise GaussADError(f"{directory}: no such model folder")
    if not path.is_file():
        raise GaussADError(f"{directory}: not a gaussad model folder (no {CONFIG_FILE})")
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GaussADError(f"{path}: corrupt model configuration ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise GaussADError(f"{path}: not a gaussad model configuration")
    if document.get("format_version") not in READABLE_VERSIONS:
        readable = " and ".join(map(str, READABLE_VERSIONS))
        raise GaussADError(
            f"{path}: model format version {document.get('format_version')!r} is not supported "
            f"(this gaussad reads versions {readable}); refit the model"
        )
    return document
