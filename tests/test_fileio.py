"""Outputs: checked before work, written atomically, with the umask's modes; staging of killed runs goes."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gaussad.errors import GaussADError
from gaussad.fileio import (
    check_destination,
    check_file_destination,
    current_umask,
    output_folders,
    replace_folder,
    write_text_atomic,
)


def dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_current_umask_is_read_without_changing_it(umask: int) -> None:
    assert current_umask() == umask
    assert os.umask(umask) == umask  # still set as it was


def test_outputs_get_the_modes_the_umask_allows(tmp_path: Path, umask: int) -> None:
    """Folders came out 0700 and files 0600 (temporary-file modes), whatever the umask."""

    def write(folder: Path) -> None:
        (folder / "marker").write_text("ours")
        (folder / "sub").mkdir()

    out = replace_folder(tmp_path / "out", write, marker="marker")
    assert mode(out) == mode(out / "sub") == 0o777 & ~umask
    assert mode(out / "marker") == 0o666 & ~umask
    write_text_atomic(tmp_path / "report.html", "<html></html>")
    assert mode(tmp_path / "report.html") == 0o666 & ~umask


def test_staging_left_by_a_killed_run_is_removed_by_the_next(tmp_path: Path) -> None:
    """After `kill -9`, the hidden .NAME.xxxx staging folder beside the output stayed forever."""
    code = (
        "import sys, time\n"
        "from gaussad.fileio import replace_folder\n"
        "def write(folder):\n"
        "    (folder / 'partial').write_text('half')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        "replace_folder(sys.argv[1], write, marker='marker')\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")], stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"writing\n"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    left = [path.name for path in tmp_path.iterdir()]
    assert left == [f".out.{child.pid}-{left[0].split('-', 1)[1]}"]  # named with the dead run's pid
    live = tmp_path / f".out.{os.getpid()}-live"  # a run still going on: kept
    live.mkdir()
    old = tmp_path / f".out.old.{dead_pid()}-x"  # a killed run's retired folder: removed too
    (old / "previous").mkdir(parents=True)

    replace_folder(tmp_path / "out", lambda folder: (folder / "marker").write_text("ours"), marker="marker")
    replace_folder(tmp_path / "out", lambda folder: (folder / "marker").write_text("again"), marker="marker")
    assert sorted(path.name for path in tmp_path.iterdir()) == [live.name, "out"]
    assert (tmp_path / "out" / "marker").read_text() == "again"


def test_output_folders_are_the_destination_and_its_staging(tmp_path: Path) -> None:
    for name in (".out.123-a", ".out.old.5-b", ".output.1-c", "out2"):
        (tmp_path / name).mkdir()
    found = sorted(path.name for path in output_folders(tmp_path / "out"))
    assert found == [".out.123-a", ".out.old.5-b", "out"]


def test_destination_checks(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep")
    with pytest.raises(GaussADError, match="foreign: exists and was not written by gaussad"):
        check_destination(tmp_path / "foreign", "marker")
    (tmp_path / "file").write_text("x")
    with pytest.raises(GaussADError, match="file: exists and is not a folder"):
        check_destination(tmp_path / "file", "marker")
    with pytest.raises(GaussADError, match=r"out: cannot be written \(.*file is not a folder\)"):
        check_destination(tmp_path / "file" / "out", "marker")
    with pytest.raises(GaussADError, match="foreign: is a folder; give a file name"):
        check_file_destination(tmp_path / "foreign")
    assert check_destination(tmp_path / "new" / "deeper", "marker") == tmp_path / "new" / "deeper"
    assert check_file_destination(tmp_path / "new" / "r.json") == tmp_path / "new" / "r.json"
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a folder of another account
    with pytest.raises(
        GaussADError, match=rf"r.json: cannot be written \(no permission to write in {tmp_path}\)"
    ):
        check_file_destination(tmp_path / "r.json")


def test_a_failed_write_leaves_the_earlier_output_and_no_staging(tmp_path: Path) -> None:
    def full_disk(folder: Path) -> None:
        raise OSError(28, "No space left on device", str(folder / "maps" / "x.npy"))

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "marker").write_text("earlier")
    with pytest.raises(OSError, match="No space left on device"):
        replace_folder(tmp_path / "out", full_disk, marker="marker")
    assert (tmp_path / "out" / "marker").read_text() == "earlier"
    assert [path.name for path in tmp_path.iterdir()] == ["out"]  # no staging left behind
