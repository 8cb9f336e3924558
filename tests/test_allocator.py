"""The allocator policy: large blocks come from the heap and stay there once freed, for the next batch."""

import ctypes
import platform

import numpy as np
import pytest

from gaussad import allocator

GLIBC = platform.libc_ver()[0] == "glibc"
BLOCK = 64 << 20  # above glibc's largest default mmap threshold (32 MiB): mmap'd without the policy


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def mallinfo() -> MallInfo2:
    function = ctypes.CDLL(None).mallinfo2
    function.restype = MallInfo2
    return function()


@pytest.mark.skipif(not GLIBC, reason="the allocator policy applies to glibc's malloc only")
def test_large_blocks_come_from_the_heap_and_stay_there_once_freed() -> None:
    assert allocator.keep_freed_memory()
    mapped_before = mallinfo().hblkhd
    block = np.ones(BLOCK, dtype=np.uint8)
    assert mallinfo().hblkhd - mapped_before < BLOCK, "the block was mmap'd: its pages go back when freed"
    del block
    assert mallinfo().fordblks >= BLOCK, "the freed block was returned to the system"


def test_other_c_libraries_keep_their_own_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() is False
