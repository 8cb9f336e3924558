"""Atomic file and folder writes: a failed or interrupted run never leaves half a result behind.

Destinations are checked before a run's work (`check_destination`, `check_file_destination`), so a wrong
one fails in a second rather than after the fit. What is written gets the modes the process's umask
allows, as any file the user creates would, not the private modes of temporary files: a model or report
written by one account is readable by another where the umask says so. A folder is staged beside its
destination in a folder named with the process id (`gaussad.scratch`): the next run there removes what a
killed one left.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from gaussad.errors import GaussADError
from gaussad.scratch import glob_escape, make_scratch


def current_umask() -> int:
    """The process's umask, read where the system tells it (Linux) rather than set and restored: setting it
    would change it for every thread for a moment. Elsewhere it is set to 0o077 (the safer side) and back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _as_created(path: Path, mode: int) -> None:
    """Give a file or folder made private by `tempfile` (0600, 0700) the mode an ordinary one gets."""
    os.chmod(path, mode & ~current_umask())


def _writable_ancestor(path: Path) -> None:
    """Fail unless the nearest existing folder above `path` is a folder this process may write in."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise GaussADError(f"{path}: cannot be written ({ancestor} is not a folder)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise GaussADError(f"{path}: cannot be written (no permission to write in {ancestor})")


def check_destination(destination: str | os.PathLike, marker: str) -> Path:
    """The absolute path of an output folder gaussad may write: absent, empty, or holding `marker` (its own
    earlier output), in a folder it may write in. Called before a run's work, and again by
    `replace_folder`."""
    destination = Path(destination).absolute()
    if destination.exists():
        if not destination.is_dir():
            raise GaussADError(f"{destination}: exists and is not a folder")
        if not (destination / marker).is_file() and any(destination.iterdir()):
            raise GaussADError(
                f"{destination}: exists and was not written by gaussad; refusing to replace it"
            )
    _writable_ancestor(destination)
    return destination


def check_file_destination(path: str | os.PathLike) -> Path:
    """The absolute path of an output file gaussad may write: not a folder, in a folder it may write in."""
    path = Path(path).absolute()
    if path.is_dir():
        raise GaussADError(f"{path}: is a folder; give a file name")
    _writable_ancestor(path)
    return path


def staging_prefix(destination: Path) -> str:
    """The name prefix of the folders a run writing `destination` stages in, beside it."""
    return f".{destination.name}."


def output_folders(destination: str | os.PathLike) -> list[Path]:
    """An output folder and the staging folders beside it (of a run going on, or left by a killed one):
    what a run reading images from the folder above must not take as input."""
    destination = Path(destination).absolute()
    staged = destination.parent.glob(glob_escape(staging_prefix(destination)) + "*")
    return [destination, *(folder for folder in staged if folder.is_dir())]


def write_bytes_atomic(path: str | os.PathLike, data: bytes, prefix: str | None = None) -> None:
    """Write a file through a temporary sibling (named `prefix`..., default `.NAME.`...) and an atomic
    rename, with the modes the umask allows: a failed write leaves no partial file and the earlier one."""
    path = check_file_destination(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=prefix or f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        _as_created(Path(temporary), 0o666)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file (UTF-8) atomically, as `write_bytes_atomic`."""
    write_bytes_atomic(path, text.encode("utf-8"))


def replace_folder(destination: str | os.PathLike, write: Callable[[Path], None], marker: str) -> Path:
    """Run write(folder) on a fresh sibling folder, then swap it in for `destination`.

    An existing destination is replaced only if it is empty or holds `marker` (i.e. our own earlier
    output), so a typo cannot wipe an unrelated folder. If `write` fails, the destination is untouched.
    """
    destination = check_destination(destination, marker)
    prefix = staging_prefix(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = make_scratch(prefix, destination.parent)
    try:
        _as_created(staging, 0o777)
        write(staging)
        swap_in(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return destination


def swap_in(staging: Path, destination: Path) -> None:
    """Put the fully written folder `staging` (beside `destination`) in place of `destination`: an earlier
    output there is moved aside first and removed only once the new one is in place."""
    if destination.exists():
        retired = make_scratch(f"{staging_prefix(destination)}old.", destination.parent)
        os.replace(destination, retired / "previous")
        os.replace(staging, destination)
        shutil.rmtree(retired)
    else:
        os.replace(staging, destination)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks so that large weight or model files do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
