"""Temporary folders that carry their process id, so that a later run can remove what a killed one left.

A run killed with SIGKILL cannot clean up: its spill files (fitting) or its half-written output folder
stay behind. Named `<prefix><pid>-<random>`, a leftover is recognised by a later run as stale once no
process with that id is alive, and removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def make_scratch(prefix: str, parent: str | os.PathLike | None = None) -> Path:
    """A new folder `<prefix><pid>-<random>` under `parent` (default: the temporary folder, TMPDIR), after
    removing the stale ones of dead processes there."""
    parent = Path(parent if parent is not None else tempfile.gettempdir())
    remove_stale(parent, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


@contextmanager
def scratch_folder(prefix: str, parent: str | os.PathLike | None = None) -> Iterator[Path]:
    """`make_scratch`, removed on leaving (whatever happens, short of the process being killed)."""
    folder = make_scratch(prefix, parent)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove `<prefix><pid>-*` folders under `parent` whose process is gone; returns what was removed."""
    removed = []
    for folder in parent.glob(f"{glob_escape(prefix)}*-*"):
        pid = folder.name[len(prefix) :].split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def glob_escape(text: str) -> str:
    """`text` with glob's special characters taken literally."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another account's process: alive, and not ours to judge
        return True
    return True
