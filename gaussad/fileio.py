"""Atomic file and folder writes: a failed or interrupted run never leaves half a result behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from gaussad.errors import GaussADError


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary sibling and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def replace_folder(destination: str | os.PathLike, write: Callable[[Path], None], marker: str) -> Path:
    """Run write(folder) on a fresh sibling folder, then swap it in for `destination`.

    An existing destination is replaced only if it is empty or holds `marker` (i.e. our own earlier
    output), so a typo cannot wipe an unrelated folder. If `write` fails, the destination is untouched.
    """
    destination = Path(destination).absolute()
    if destination.exists():
        if not destination.is_dir():
            raise GaussADError(f"{destination}: exists and is not a folder")
        if not (destination / marker).is_file() and any(destination.iterdir()):
            raise GaussADError(
                f"{destination}: exists and was not written by gaussad; refusing to replace it"
            )
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        write(staging)
        if destination.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old.", dir=destination.parent))
            os.replace(destination, retired / "previous")
            os.replace(staging, destination)
            shutil.rmtree(retired)
        else:
            os.replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return destination
