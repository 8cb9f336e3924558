"""Feature stores: what was appended comes back in order, whatever the chunks, on disk as in memory."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gaussad.store import DiskStore, MemoryStore, open_store


@settings(max_examples=40, deadline=None)
@given(
    appends=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    data=st.data(),
)
def test_reads_return_the_appended_rows(tmp_path_factory, appends: list[int], data) -> None:
    rows = np.arange(sum(appends) * 6, dtype=np.float32).reshape(-1, 2, 3)
    stores = [DiskStore(tmp_path_factory.mktemp("store") / "rows.f32"), MemoryStore()]
    for store in stores:
        start = 0
        for count in appends:
            store.append(rows[start : start + count])
            start += count
    first = data.draw(st.integers(0, len(rows) - 1))
    stop = data.draw(st.integers(first, len(rows)))
    per_chunk = data.draw(st.integers(1, 7))
    for store in stores:
        assert store.count == len(rows) and store.row_values == 6
        starts = [start for start, _ in store.read(first, stop, per_chunk)]
        assert starts == list(range(first, stop, per_chunk))
        chunks = [chunk for _, chunk in store.read(first, stop, per_chunk)]
        assert all(len(chunk) <= per_chunk for chunk in chunks)
        read = np.concatenate(chunks) if chunks else np.zeros((0, 2, 3), np.float32)
        np.testing.assert_array_equal(read, rows[first:stop])


def test_a_store_refuses_rows_of_another_shape() -> None:
    store = MemoryStore()
    store.append(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"from \(4,\) to \(5,\)"):
        store.append(np.zeros((1, 5)))


def test_open_store_by_kind(tmp_path) -> None:
    assert isinstance(open_store("disk", tmp_path, "level3"), DiskStore)
    assert open_store("disk", tmp_path, "level3").path == tmp_path / "level3.f32"
    assert isinstance(open_store("memory", None, "level3"), MemoryStore)
    assert open_store("none", None, "level3") is None
    with pytest.raises(ValueError, match="disk, memory, none"):
        open_store("ssd", tmp_path, "level3")
