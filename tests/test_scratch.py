"""Temporary folders of killed runs are recognised by their process id and removed by the next run."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gaussad.scratch import make_scratch, remove_stale, scratch_folder


def dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_folders_of_dead_processes_go_and_others_stay(tmp_path: Path) -> None:
    stale = tmp_path / f"gaussad-fit-{dead_pid()}-x1"
    live = tmp_path / f"gaussad-fit-{os.getpid()}-x2"
    other = tmp_path / "gaussad-fit-notes"
    for folder in (stale, live, other):
        (folder / "inner").mkdir(parents=True)
    assert remove_stale(tmp_path, "gaussad-fit-") == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_scratch_folders_carry_the_pid_and_are_removed(tmp_path: Path) -> None:
    with scratch_folder(".model.", tmp_path) as folder:
        assert folder.parent == tmp_path and folder.name.startswith(f".model.{os.getpid()}-")
    assert not folder.exists()
    with pytest.raises(RuntimeError), scratch_folder(".model.", tmp_path) as folder:
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_a_fit_clears_the_spill_a_killed_fit_left(category: Path, tmp_path: Path, monkeypatch) -> None:
    from gaussad import GaussAD
    from gaussad.model import SPILL_PREFIX

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what TMPDIR sets
    leftover = tmp_path / f"{SPILL_PREFIX}{dead_pid()}-abc"
    leftover.mkdir()
    (leftover / "level3.f32").write_bytes(b"\0" * 1024)
    GaussAD(image_size=64, device="cpu", folds=0).fit(sorted((category / "train" / "good").iterdir())[:3])
    assert list(tmp_path.iterdir()) == []  # the leftover and the fit's own spill are gone
    assert make_scratch(SPILL_PREFIX).parent == tmp_path
