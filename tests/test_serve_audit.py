"""The audit trail in SQLite and in a real PostgreSQL (a throwaway cluster on loopback), the service
recording into it, and `gaussad history` reading it."""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, update
from test_serve_support import fitted_model, inspection_images, serve_app

from gaussad import GaussADError
from gaussad.serve.audit import SCHEMA_VERSION, AuditRecord, AuditStore, audit_url, schema_version
from gaussad.serve.commands import add_commands
from gaussad.serve.history import parse_since

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
PG_TIMEOUT = 60  # seconds for each cluster command


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _pg_binaries() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    return Path(found).parent if found else None


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port (as the postgres user when run as root,
    which initdb refuses); stopped and removed afterwards. Skips, saying why, where it cannot start."""
    binaries = _pg_binaries()
    if binaries is None:
        pytest.skip(
            "PostgreSQL is not installed (no initdb): apt-get install postgresql; `make test` does it"
        )
    root = Path(tempfile.mkdtemp(prefix="gaussad-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    pg_ctl = [*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-w", "-t", str(PG_TIMEOUT)]
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    try:
        for command in (
            [
                *as_user,
                str(binaries / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
            [*pg_ctl, "-o", options, "-l", str(root / "log"), "start"],
        ):
            subprocess.run(command, check=True, capture_output=True, timeout=PG_TIMEOUT)
    except (OSError, LookupError, subprocess.SubprocessError) as error:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL could not start here: {error}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, timeout=PG_TIMEOUT)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def audit(request, tmp_path: Path) -> str:
    """An empty audit store of each kind (the PostgreSQL one emptied between tests)."""
    if request.param == "sqlite":
        return str(tmp_path / "audit.sqlite3")
    url = request.getfixturevalue("postgres")
    engine = create_engine(audit_url(url))
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE IF EXISTS gaussad_decisions, gaussad_audit_version")
    engine.dispose()
    return url


def record(**changes) -> AuditRecord:
    values = {
        "time": NOW,
        "request_id": "r-1",
        "client": "127.0.0.1",
        "route": "inspect",
        "image_sha256": "a" * 64,
        "image_width": 900,
        "image_height": 600,
        "image_bytes": 123456,
        "image_kept": False,
        "model": "bottle",
        "model_sha256": "b" * 64,
        "image_threshold": 2.5,
        "pixel_threshold": 11.25,
        "score": 1.25,
        "normalized_score": 0.25,
        "is_anomalous": False,
        "latency_ms": 12.5,
    }
    return AuditRecord(**(values | changes))


def test_store_round_trip_and_filters(audit: str) -> None:
    store = AuditStore(audit)
    store.insert(
        [
            record(),
            record(request_id="r-2", time=NOW + timedelta(minutes=5), score=3.0, is_anomalous=True),
            record(request_id="r-3", time=NOW + timedelta(minutes=9), model="tiles", pixel_threshold=None),
        ]
    )
    rows = store.query()
    assert [row["request_id"] for row in rows] == ["r-3", "r-2", "r-1"]  # newest first
    assert rows[2] == {**record().__dict__, "time": NOW}  # every field back as recorded, time in UTC
    assert rows[0]["pixel_threshold"] is None and rows[0]["time"].tzinfo == timezone.utc
    assert [r["request_id"] for r in store.query(since=NOW + timedelta(minutes=4))] == ["r-3", "r-2"]
    assert [r["request_id"] for r in store.query(model="bottle", anomalous=True)] == ["r-2"]
    assert [r["request_id"] for r in store.query(limit=1)] == ["r-3"]
    store.close()
    reopened = AuditStore(audit)  # opening again migrates nothing and keeps the rows
    assert len(reopened.query()) == 3
    with reopened.engine.connect() as connection:
        assert connection.execute(schema_version.select()).scalars().all() == [SCHEMA_VERSION]
    reopened.close()


def test_a_store_of_a_newer_gaussad_is_refused(audit: str) -> None:
    store = AuditStore(audit)
    with store.engine.begin() as connection:
        connection.execute(update(schema_version).values(version=SCHEMA_VERSION + 1))
    store.close()
    with pytest.raises(GaussADError, match="newer than this gaussad"):
        AuditStore(audit)


def test_audit_urls(tmp_path: Path) -> None:
    assert audit_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert audit_url("postgres://u:p@h:5433/db") == "postgresql+psycopg://u:p@h:5433/db"
    assert audit_url(str(tmp_path / "a.sqlite3")) == f"sqlite:///{tmp_path / 'a.sqlite3'}"
    for bad, message in (
        ("mysql://u@h/db", "expected a SQLite file path"),
        ("sqlite://", "expected a SQLite file path"),
        (str(tmp_path / "missing" / "a.sqlite3"), "does not exist"),
    ):
        with pytest.raises(GaussADError, match=message):
            audit_url(bad)
    with pytest.raises(
        GaussADError, match="audit store postgresql\\+psycopg://u:\\*\\*\\*@127.0.0.1:1/x"
    ) as error:
        AuditStore("postgresql://u:secret@127.0.0.1:1/x")  # nothing listens on port 1
    assert "secret" not in str(error.value)


def test_since_takes_durations_and_times() -> None:
    assert parse_since("30m", now=NOW) == NOW - timedelta(minutes=30)
    assert parse_since("1.5h", now=NOW) == NOW - timedelta(minutes=90)
    assert parse_since("2025-06-01T08:00") == datetime(2025, 6, 1, 8, 0, tzinfo=timezone.utc)
    assert parse_since("2025-06-01T10:00+02:00") == datetime(2025, 6, 1, 8, 0, tzinfo=timezone.utc)
    with pytest.raises(GaussADError, match="--since 'yesterday'"):
        parse_since("yesterday")


def history(*args: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["history", *args])


def run_history(capsys, *args: str) -> str:
    parsed = history(*args)
    parsed.handler(parsed)
    return capsys.readouterr().out


def test_the_service_records_every_decision_and_history_reads_them(
    audit: str, category: Path, tmp_path_factory, tmp_path: Path, capsys
) -> None:
    model = fitted_model(category, tmp_path_factory)
    images = inspection_images(category)
    with serve_app(model, tmp_path, audit=audit) as client:
        answers = [
            client.post(
                "/v1/models/widget/inspect",
                content=path.read_bytes(),
                headers={"Content-Type": "image/png", "X-Request-ID": f"part-{i}"},
            ).json()
            for i, path in enumerate(images[2:6])
        ]
    rows = json.loads(run_history(capsys, "--audit", audit, "--format", "json"))
    assert [row["request_id"] for row in rows] == ["part-0", "part-1", "part-2", "part-3"]  # oldest first
    for row, answer in zip(rows, answers, strict=True):
        for key in ("model", "model_sha256", "score", "is_anomalous", "image_threshold", "image_sha256"):
            assert row[key] == answer[key], key
        assert (row["image_width"], row["image_height"], row["client"]) == (96, 96, "testclient")
        assert row["route"] == "inspect" and row["latency_ms"] > 0
    flagged = run_history(capsys, "--audit", audit, "--anomalous", "--format", "csv").splitlines()
    assert flagged[0].startswith("time,request_id,client") and [
        line.split(",")[1] for line in flagged[1:]
    ] == [
        "part-2",
        "part-3",
    ]
    table = run_history(capsys, "--audit", audit, "--model", "widget", "--since", "1h", "--limit", "2")
    assert table.splitlines()[0].startswith("time (UTC)") and "part-3" in table and "part-1" not in table
    assert run_history(capsys, "--audit", audit, "--model", "other", "--format", "json").strip() == "[]"


def test_history_without_a_trail_says_so(tmp_path: Path) -> None:
    parsed = history("--audit", str(tmp_path / "none.sqlite3"))
    with pytest.raises(GaussADError, match="no audit trail at"):
        parsed.handler(parsed)
