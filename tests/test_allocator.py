"""The allocator policy: while held, large blocks come from the heap and stay there once freed."""

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
def test_large_blocks_come_from_the_heap_and_stay_there_while_held() -> None:
    with allocator.keep_freed_memory() as applied:
        assert applied
        mapped_before = mallinfo().hblkhd
        block = np.ones(BLOCK, dtype=np.uint8)
        assert mallinfo().hblkhd - mapped_before < BLOCK, "the block was mmap'd: its pages go back when freed"
        del block
        assert mallinfo().fordblks >= BLOCK, "the freed block was returned to the system"
        heap_held = mallinfo().arena
    assert heap_held - mallinfo().arena >= BLOCK, "the kept memory was not returned on leaving"
    mapped_before = mallinfo().hblkhd
    block = np.ones(BLOCK, dtype=np.uint8)
    mapped = mallinfo().hblkhd - mapped_before
    del block
    assert mapped >= BLOCK, "glibc's default (mmap for large blocks) not restored"


@pytest.mark.skipif(not GLIBC, reason="the allocator policy applies to glibc's malloc only")
def test_the_policy_holds_until_its_last_holder_leaves() -> None:
    with allocator.keep_freed_memory():
        with allocator.keep_freed_memory():
            pass
        mapped_before = mallinfo().hblkhd
        block = np.ones(BLOCK, dtype=np.uint8)
        assert mallinfo().hblkhd - mapped_before < BLOCK, "an inner holder's exit ended the policy"
        del block


def test_other_c_libraries_keep_their_own_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    allocator._libc.cache_clear()
    try:
        with allocator.keep_freed_memory() as applied:
            assert applied is False
    finally:
        allocator._libc.cache_clear()
