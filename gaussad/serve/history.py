"""`gaussad history`: the audit trail's decisions as a table, CSV or JSON, and its `--since` times."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from gaussad.errors import GaussADError
from gaussad.serve.audit import COLUMNS

_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A UTC time from `--since`: a duration ago (90s, 30m, 12h, 7d) or an ISO 8601 date or time (UTC
    unless it names its offset)."""
    ago = _AGO.fullmatch(text.strip())
    if ago:
        return (now or datetime.now(timezone.utc)) - timedelta(**{_UNITS[ago[2]]: float(ago[1])})
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise GaussADError(
            f"--since {text!r}: expected a duration (30m, 12h, 7d) or a time such as 2025-06-01T08:00"
        ) from None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _decision(row: dict[str, Any]) -> str:
    return "anomalous" if row["is_anomalous"] else "good"


def format_rows(rows: list[dict[str, Any]], kind: str) -> str:
    """Decisions (audit rows, in the order given) as a table for reading, or all columns as CSV or JSON."""
    if kind == "json":
        return json.dumps([row | {"time": row["time"].isoformat()} for row in rows], indent=2)
    if kind == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(row | {"time": row["time"].isoformat()} for row in rows)
        return buffer.getvalue().rstrip("\n")
    header = (
        "time (UTC)",
        "model",
        "model SHA",
        "score",
        "norm.",
        "decision",
        "image SHA",
        "size",
        "ms",
        "request id",
    )
    lines = [
        (
            row["time"].strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            row["model"],
            row["model_sha256"][:12],
            f"{row['score']:.4f}",
            f"{row['normalized_score']:.3f}",
            _decision(row),
            row["image_sha256"][:12],
            f"{row['image_width']}x{row['image_height']}",
            f"{row['latency_ms']:.1f}",
            row["request_id"],
        )
        for row in rows
    ]
    widths = [max(len(value) for value in column) for column in zip(header, *lines, strict=True)]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in [header, *lines]
    )
