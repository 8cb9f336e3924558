"""A Ray predict run's progress on disk, so that a restarted run scores only the images still missing.

The run writes into a folder beside its output (`.OUT.ray`), swapped in for OUT when it is complete. In
it, `.parts/manifest.json` names what the run is: the model folder's checksum (`persistence.model_sha256`:
its parameters, Gaussians and thresholds), a hash of the inputs with their output names, and whether
overlays are drawn. Each finished shard writes its rows to `.parts/part-<first image>.parquet`, atomically
and after its maps and pictures, so a part on disk means a finished shard. A restart with the same
manifest keeps the parts; one with another model or other inputs is refused, or starts over when told to.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gaussad.decisions import Decision, Defect, PredictionRow
from gaussad.decoding import ImageError
from gaussad.errors import GaussADError
from gaussad.fileio import write_bytes_atomic, write_text_atomic
from gaussad.outputs import ScoredImages
from gaussad.persistence import model_sha256

PARTS_FOLDER = ".parts"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "gaussad-predict-run"
PARQUET_FILE = "predictions.parquet"
PART_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("score", pa.float64()),
        ("normalized_score", pa.float64()),
        ("is_anomalous", pa.bool_()),
        ("defect_area", pa.int64()),
        ("defect_regions", pa.int64()),
        ("defect_box", pa.list_(pa.int64())),
        ("error", pa.string()),
        ("map_min", pa.float64()),
        ("map_max", pa.float64()),
    ]
)


def run_identity(model_dir: str | Path, pairs: Sequence[tuple[Path, Path]], overlays: bool) -> dict:
    """What a run's parts were made from: a restart must match it to keep them."""
    inputs = hashlib.sha256()
    for image, name in pairs:
        inputs.update(f"{Path(image).absolute()}\t{name}\n".encode())
    return {
        "format": MANIFEST_FORMAT,
        "model_sha256": model_sha256(model_dir),
        "inputs_sha256": inputs.hexdigest(),
        "images": len(pairs),
        "overlays": overlays,
    }


@dataclass(frozen=True)
class StagedRun:
    """The folder a Ray predict run writes in, its identity and its parts."""

    folder: Path
    identity: dict

    @property
    def parts(self) -> Path:
        return self.folder / PARTS_FOLDER

    @classmethod
    def open(cls, folder: Path, identity: dict, restart: bool) -> StagedRun:
        """The run staged in `folder` for `identity`: resumed where its manifest matches, else discarded
        when `restart`, else refused. Nothing is written until `begin`."""
        run = cls(folder, identity)
        if folder.exists() and run._manifest() != identity:
            if not restart:
                raise GaussADError(
                    f"{folder}: holds an unfinished run with another model or other inputs; rerun it as it "
                    "was to finish it, or pass --restart to discard it"
                )
            shutil.rmtree(folder)
        return run

    def begin(self) -> None:
        """Create the run's folder and manifest, where a run is not already there."""
        if not self.parts.exists():
            self.parts.mkdir(parents=True)
            write_text_atomic(self.parts / MANIFEST_FILE, json.dumps(self.identity, indent=2) + "\n")

    def _manifest(self) -> dict | None:
        try:
            return json.loads((self.parts / MANIFEST_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None

    def finished(self, paths: Sequence[str]) -> ScoredImages:
        """The rows of every finished shard (their `path` from `paths`, the run's inputs as given)."""
        finished = ScoredImages()
        if not self.parts.exists():
            return finished
        for part in sorted(self.parts.glob("part-*.parquet")):
            for record in pq.read_table(part, schema=PART_SCHEMA).to_pylist():
                index = record["index"]
                if record["error"]:
                    finished.errors.append(ImageError(index, paths[index], record["error"]))
                    finished.rows[index] = PredictionRow(paths[index], error=record["error"])
                    continue
                decision = Decision(record["score"], record["normalized_score"], record["is_anomalous"])
                defect = None
                if record["defect_area"] is not None:
                    box = record["defect_box"]
                    defect = Defect(record["defect_area"], record["defect_regions"], box and tuple(box))
                finished.rows[index] = PredictionRow(paths[index], decision, defect)
                finished.map_ranges[index] = record["map_min"], record["map_max"]
        return finished


def write_part(parts: Path, scored: ScoredImages) -> None:
    """A finished shard's rows, as one Parquet file written atomically."""
    records = []
    for index, row in sorted(scored.rows.items()):
        decision, defect = row.decision, row.defect
        low, high = scored.map_ranges.get(index, (None, None))
        records.append(
            {
                "index": index,
                "score": decision and decision.score,
                "normalized_score": decision and decision.normalized_score,
                "is_anomalous": decision and decision.is_anomalous,
                "defect_area": defect and defect.area,
                "defect_regions": defect and defect.regions,
                "defect_box": defect and defect.box and list(defect.box),
                "error": row.error or None,
                "map_min": low,
                "map_max": high,
            }
        )
    first = min(scored.rows)
    write_bytes_atomic(
        parts / f"part-{first:09d}.parquet", _parquet(pa.Table.from_pylist(records, PART_SCHEMA))
    )


def predictions_parquet(rows: Sequence[PredictionRow]) -> bytes:
    """predictions.parquet: `path, score, normalized_score, is_anomalous` per row of predictions.csv
    (null where the CSV is empty: no threshold, or an image skipped)."""
    columns = {
        "path": pa.array([row.path for row in rows], pa.string()),
        "score": pa.array([row.decision and row.decision.score for row in rows], pa.float64()),
        "normalized_score": pa.array(
            [row.decision and row.decision.normalized_score for row in rows], pa.float64()
        ),
        "is_anomalous": pa.array([row.decision and row.decision.is_anomalous for row in rows], pa.bool_()),
    }
    return _parquet(pa.table(columns))


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()
