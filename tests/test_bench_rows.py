"""`benchmarks/bench_rows.py`: the tuning scripts' rows, saved as each finishes and skipped on a rerun."""

import json
from pathlib import Path

from conftest import benchmark_script

bench_rows = benchmark_script("bench_rows")


def test_a_row_is_computed_once_saved_at_once_and_skipped_on_a_rerun(tmp_path: Path, capsys) -> None:
    calls = []

    def compute(*args):
        calls.append(args)
        return {"image_auroc": 0.9, "selection": {"long": "evidence"}}

    rows = bench_rows.Rows(tmp_path / "new" / "out")  # its folder made before any row is computed
    assert (tmp_path / "new").is_dir()
    rows = bench_rows.Rows(tmp_path / "out")
    row = rows.ensure(("bottle", "defaults"), compute, 1, 2, shown=lambda row: row["image_auroc"])
    assert row["image_auroc"] == 0.9 and calls == [(1, 2)]
    assert capsys.readouterr().out == "bottle defaults 0.9\n"
    assert json.loads((tmp_path / "out.json").read_text()) == {"bottle": {"defaults": row}}
    rows.ensure(("bottle", "seed 1", "with the grid"), compute)  # nested as deep as the keys go
    again = bench_rows.Rows(tmp_path / "out")  # a rerun reads what is there and computes nothing again
    assert again.ensure(("bottle", "defaults"), compute) == row and len(calls) == 2
    assert again.rows["bottle"]["seed 1"]["with the grid"]["image_auroc"] == 0.9
    again.write_table("| table |\n")
    assert (tmp_path / "out.md").read_text() == "| table |\n"
